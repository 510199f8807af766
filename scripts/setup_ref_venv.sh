#!/usr/bin/env bash
# Build (or reuse) the reference venv of the weight-conversion parity tests (tests/test_convert.py): PyTorch + timm,
# and Keras 3 on the torch backend, + h5py. They cannot share .venv with MXNet/gluoncv (torch>=2 breaks
# `import gluoncv`), so the tests run them as subprocesses with this venv's python (tests/reference/*.py).
#
#   bash scripts/setup_ref_venv.sh [PYTHON] [VENV]     # defaults: python3 (3.11), .venv-ref
#
# Idempotent: a venv whose stamp matches the requirements below and whose imports work is left alone.
# About 2.5 minutes and 5.6 GB (torch 2.14.1 is the CUDA-capable build; it runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-${PYTHON:-python3}}
VENV=${2:-${REF_VENV:-.venv-ref}}
REQS=("torch==2.14.1" "torchvision==0.29.1" "timm>=1.0" "keras>=3,<4" "h5py" "safetensors" "numpy")
STAMP="$VENV/.xception_mx-ref-installed"
WANT="${REQS[*]}"
export KERAS_BACKEND=torch
CHECK="import torch, timm, keras, h5py, safetensors; assert keras.backend.backend() == 'torch'"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "reference venv $VENV is up to date"
    exit 0
fi
start=$(date +%s)
pip_install() {  # quiet, minus pip's notes about this machine's local index folders
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip_install --upgrade pip
pip_install "${REQS[@]}"
"$VENV/bin/python" -c "$CHECK"
echo "$WANT" > "$STAMP"
echo "reference venv $VENV ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
