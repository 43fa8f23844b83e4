#!/usr/bin/env bash
# The one script for a GPU machine (an H200: torch 2.11, Python 3.12, nothing to download).
# Builds and installs tike_cuda, runs the tests (the CUDA ones run there), compute-sanitizer
# memcheck and racecheck on a small case, a small benchmark preset and the target shape.
# Every log and CSV goes under $OUT (default ./gpu_out); the summary table prints last.
# Budget: about 11 minutes; every step has its own time limit and the next step runs
# whatever the previous one returned.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
declare -A RC

step() { echo; echo "=== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "build (pip install .)"
MAX_JOBS=16 timeout 420 $PY -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
RC[build]=$?
tail -3 "$OUT/build.log"
if [ "${RC[build]}" -ne 0 ]; then
  tail -40 "$OUT/build.log"
  echo "build failed (rc ${RC[build]}); nothing else can run"
  exit 1
fi
# Import from the installed package, not from the source tree.
(cd /tmp && $PY -c "import tike_cuda, torch; print('tike_cuda with CUDA:', tike_cuda.built_with_cuda())")

# The CUDA kernel tests first, on the GPU only (their emulated twins run in CI), then the
# rest; never -x: one failure must not hide the results after it.
step "pytest: CUDA kernels"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_kernels.py 2>&1 | \
  tee "$OUT/pytest_cuda.log" | tail -25
RC[pytest_cuda]=${PIPESTATUS[0]}

step "pytest: everything else"
timeout 200 $PY -m pytest -q -p no:cacheprovider --ignore=tests/test_cuda_kernels.py tests 2>&1 | tee "$OUT/pytest.log" | tail -25
RC[pytest]=${PIPESTATUS[0]}

step "compute-sanitizer memcheck"
timeout 100 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
  $PY bench/sanitize_case.py >"$OUT/memcheck.log" 2>&1
RC[memcheck]=$?
tail -6 "$OUT/memcheck.log"

step "compute-sanitizer racecheck"
timeout 100 "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 9 --print-limit 20 \
  $PY bench/sanitize_case.py >"$OUT/racecheck.log" 2>&1
RC[racecheck]=$?
tail -6 "$OUT/racecheck.log"

step "benchmark harness (small preset)"
timeout 120 $PY -m tike_cuda bench --device cuda --ops topk_kl,full_kl,token_logprobs \
  --providers tike_cuda,eager --N 2048 --V 151936 --k 16,64 --dtype bf16 --repeats 5 \
  --warmup 2 --out "$OUT/bench" --no-plot --no-progress 2>&1 | tail -24
RC[bench]=${PIPESTATUS[0]}

step "target shape N=16384 V=151936 bf16"
timeout 240 $PY bench/gpu_targets.py --out "$OUT/targets.csv" 2>&1 | tee "$OUT/targets.log" | \
  grep -v '^  ' >/dev/null
RC[targets]=${PIPESTATUS[0]}

echo
echo "=== summary (rc: 0 ok, 124 timed out)"
for s in build pytest_cuda pytest memcheck racecheck bench targets; do printf '  %-10s rc=%s\n' "$s" "${RC[$s]}"; done
grep -hE "passed|failed|error" "$OUT/pytest_cuda.log" "$OUT/pytest.log" | tail -4
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/memcheck.log" "$OUT/racecheck.log" || true
echo
sed -n '/^N=/,$p' "$OUT/targets.log"
