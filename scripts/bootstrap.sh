#!/usr/bin/env bash
# Everything a fresh machine needs, in one idempotent step: a virtual environment (.venv)
# with torch and the test/analysis dependencies, then tike_cuda built and installed into
# it (CPU kernels always; CUDA kernels for sm_90 when nvcc is found).
#
#   PYTHON=python3.11   the interpreter for the venv          (default: python3)
#   TORCH_SPEC=...      the torch requirement                 (default: torch==2.14.1)
#   TIKE_CUDA=0|1       force the CUDA part off/on            (default: on when nvcc exists)
#   MAX_JOBS=N          parallel compile jobs                 (default: 2)
#   TIKE_TRL=0          skip the [trl] extra (trl, transformers, datasets, peft)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${TIKE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

python -m pip install --quiet --disable-pip-version-check \
  "${TORCH_SPEC:-torch==2.14.1}" numpy ninja pybind11 setuptools wheel \
  pytest hypothesis matplotlib tqdm safetensors
# --no-build-isolation: build against the torch installed above, so the extension's ABI
# matches the torch it runs with.
MAX_JOBS=${MAX_JOBS:-2} python -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps .
# The [trl] extra (TRL integration; tests/test_trl.py), at the versions setup.py pins; read
# from the installed package's metadata, so nothing is built twice. TIKE_TRL=0 skips it.
if [ "${TIKE_TRL:-1}" != "0" ]; then
  python -m pip install --quiet --disable-pip-version-check "tike_cuda[trl]"
fi
python -c "import tike_cuda; print('tike_cuda', tike_cuda.__version__, '| CUDA kernels built:', tike_cuda.built_with_cuda())"
