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
#   TIKE_VERL=0         skip .venv-verl, the environment of the [verl] extra (verl, ray, ...)
#   TIKE_VERL_VENV=DIR  where that environment goes           (default: .venv-verl)
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
# matches the torch it runs with. Built once, as a wheel, that .venv-verl installs too.
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
MAX_JOBS=${MAX_JOBS:-2} python -m pip wheel --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps -w "$WHEELS" .
python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
  "$WHEELS"/tike_cuda-*.whl
# The [trl] extra (TRL integration; tests/test_trl.py), at the versions setup.py pins; read
# from the installed package's metadata, so nothing is built twice. TIKE_TRL=0 skips it.
if [ "${TIKE_TRL:-1}" != "0" ]; then
  python -m pip install --quiet --disable-pip-version-check "tike_cuda[trl]"
fi
python -c "import tike_cuda; print('tike_cuda', tike_cuda.__version__, '| CUDA kernels built:', tike_cuda.built_with_cuda())"
# The [verl] extra (verl plugin; tests/test_verl_*.py) pins transformers below what [trl]
# pins, so it gets its own environment: the same Python and torch, the wheel built above,
# then the extra. tests/test_verl.py runs the verl tests there. TIKE_VERL=0 skips it.
if [ "${TIKE_VERL:-1}" != "0" ]; then
  VERL_VENV=${TIKE_VERL_VENV:-.venv-verl}
  [ -x "$VERL_VENV/bin/python" ] || "$PY" -m venv "$VERL_VENV"
  vpip() { "$VERL_VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }
  vpip install "${TORCH_SPEC:-torch==2.14.1}" pytest pytest-timeout==2.4.0
  vpip install --no-deps --force-reinstall "$WHEELS"/tike_cuda-*.whl
  vpip install "tike_cuda[verl]"
  "$VERL_VENV/bin/python" -c "import verl, tike_cuda.integrations.verl as v; print('verl', verl.__version__, '| tike_cuda plugin installed:', v.installed())"
fi
