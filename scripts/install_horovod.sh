#!/usr/bin/env bash
# Build Horovod 0.28.1 for this venv's mxnet 1.9.1, with gloo and without MPI, TensorFlow or PyTorch.
# Usage: scripts/install_horovod.sh [PYTHON]   (default: .venv/bin/python)
# Idempotent: does nothing when `import horovod.mxnet` already works. Needs cmake and g++ (about 4 minutes on 2 cores).
set -euo pipefail
PY="${1:-.venv/bin/python}"
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
    echo "install_horovod.sh: error: python '$PY' not found (pass the venv's python, e.g. .venv/bin/python)" >&2
    exit 2
fi
if "$PY" -c 'import horovod.mxnet' >/dev/null 2>&1; then
    echo "install_horovod.sh: horovod.mxnet already importable in $PY: nothing to do"
    exit 0
fi
for tool in cmake g++; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install_horovod.sh: error: $tool is needed to build horovod (apt-get install cmake g++)" >&2
        exit 2
    fi
done
# numpy must stay below 1.24 for mxnet 1.9.1: pin it to what is installed so pip cannot upgrade it.
NUMPY="$("$PY" -c 'import numpy; print(numpy.__version__)')"
echo "install_horovod.sh: building horovod 0.28.1 against $("$PY" -c 'import mxnet; print("mxnet", mxnet.__version__)') (gloo, no MPI); a few minutes"
HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITH_GLOO=1 \
HOROVOD_WITHOUT_MPI=1 MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-2}" \
    "$PY" -m pip install -q --no-build-isolation --no-cache-dir "horovod==0.28.1" "numpy==$NUMPY"
"$PY" -c 'import horovod.mxnet as hvd; print("install_horovod.sh: horovod", __import__("horovod").__version__, "ready")'
