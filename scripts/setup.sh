#!/usr/bin/env bash
# Make .venv/ at the repository root with sol and its dev tools installed.
# The constraints file pins the CPU build of torch for dev/CI machines; GPU users
# install without it (see README, "GPU install").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# Integration tests start their own redis-server on a free port; install it if missing.
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "warning: redis-server not found; install it (e.g. apt-get install redis-server) for the integration tests" >&2
  fi
fi
# The playground's test drives a real headless browser: Debian's Chromium and its driver.
if ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "warning: chromium/chromedriver not found; install them (apt-get install chromium chromium-driver) for the playground test" >&2
  fi
fi
echo "ready: $(.venv/bin/sol --help >/dev/null && echo 'sol installed in .venv/')"
