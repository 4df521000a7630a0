#!/usr/bin/env bash
# Make CTranslate2 in its own virtual environment, .bench/ct2-venv/ (ignored by git), the
# second offline anchor of `sol bench vs-vllm` (with its transformers converter,
# `ct2-transformers-converter`). Never a dependency of sol: the benchmark drives it as a
# subprocess (bench/ct2_offline_worker.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CT2_VENV:-.bench/ct2-venv}
CT2_VERSION=${CT2_VERSION:-4.8.5}
mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# The converter loads the model with transformers (and so torch: the local CPU wheel,
# through the same constraints file as sol's own venv).
"$VENV/bin/python" -m pip install --progress-bar off -c constraints.txt "ctranslate2==$CT2_VERSION" transformers \
  safetensors torch
"$VENV/bin/python" - <<'PY'
import ctranslate2
print(f"ready: ctranslate2 {ctranslate2.__version__}; CPU compute types "
      f"{sorted(ctranslate2.get_supported_compute_types('cpu'))}")
PY
