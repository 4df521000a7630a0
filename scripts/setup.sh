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
# Build the CPU kernels now (the engine's paged attention, the model's fused elementwise
# ops: about 30 s each, once; cached under ~/.cache/torch_extensions) rather than in the
# first server or test that starts an engine.
if ! .venv/bin/python -c "import sys; from server.engine.paged_attention import available; sys.exit(0 if available() else 1)"; then
  echo "warning: the paged attention kernel could not be built (a C++ compiler is needed); the engine will use its portable attention path" >&2
fi
if ! .venv/bin/python -c "import sys; from gpt.fused_ops import available; sys.exit(0 if available() else 1)"; then
  echo "warning: the fused elementwise kernels could not be built (a C++ compiler is needed); the model will use PyTorch's ops" >&2
fi
echo "ready: $(.venv/bin/sol --help >/dev/null && echo 'sol installed in .venv/')"
