#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-deploy-tools.sh
.venv/bin/ruff check .
# The layer contracts in pyproject.toml ([tool.importlinter]; ARCHITECTURE.md draws them).
.venv/bin/lint-imports
# pytest exits 5 when it collects no test: that is a failure here, not a pass.
exec .venv/bin/python -m pytest "$@"
