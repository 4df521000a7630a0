#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-deploy-tools.sh
# The playground's test drives a real headless browser: Debian's Chromium and its driver.
if ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "warning: chromium/chromedriver not found; install them (apt-get install chromium chromium-driver) for the playground test" >&2
  fi
fi
.venv/bin/ruff check .
# The layer contracts in pyproject.toml ([tool.importlinter]; ARCHITECTURE.md draws them).
.venv/bin/lint-imports
# pytest exits 5 when it collects no test: that is a failure here, not a pass.
exec .venv/bin/python -m pytest "$@"
