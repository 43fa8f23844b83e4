#!/usr/bin/env bash
# The one script for a GPU machine (an H200: torch 2.11, Python 3.12, nothing to download).
# Builds and installs tike_cuda, runs the tests (the CUDA ones run there), compute-sanitizer
# memcheck, racecheck and synccheck on small cases, and the target-shape benchmarks.
# Every log and CSV goes under $OUT (default ./gpu_out); the summary table prints last.
#
#   bash bench/gpu_check.sh            # both phases (about 14 minutes at most)
#   bash bench/gpu_check.sh correct    # build, tests, sanitizers        (<= 9.5 minutes)
#   bash bench/gpu_check.sh speed      # build if needed, benchmarks      (<= 9.5 minutes)
#
# One device call runs at most 10 minutes, so run the phases as two calls on the same warm
# machine: `speed` reuses the installed build when it is of this source tree. Every step has
# its own time limit and the next step runs whatever the previous one returned.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
case "$PHASE" in all|correct|speed) ;; *) echo "usage: $0 [all|correct|speed]"; exit 2;; esac
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
declare -A RC
STEPS=()

step() { echo; echo "=== $1 ($(date +%T))"; }
# run NAME SECONDS CMD...: the command's rc under RC[NAME], its output under $OUT/NAME.log.
run() {
  local name=$1 secs=$2; shift 2
  step "$name"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  STEPS+=("$name")
}

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The source tree's fingerprint: a build of the same tree is reused by the next phase.
SRC_HASH="$(cat setup.py CMakeLists.txt $(find csrc python -type f \( -name '*.cu*' -o -name '*.h' -o -name '*.cpp' -o -name '*.py' \) | sort) 2>/dev/null | sha256sum | cut -c1-16)"
STAMP="$HOME/.tike_cuda_gpu_build"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$SRC_HASH" ] && \
   (cd /tmp && $PY -c "import tike_cuda, sys; sys.exit(not tike_cuda.built_with_cuda())") 2>/dev/null; then
  echo "build: reusing the installed build of this tree ($SRC_HASH)"
  RC[build]=0
  STEPS+=(build)
else
  run build 420 env MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps .
  tail -3 "$OUT/build.log"
  if [ "${RC[build]}" -ne 0 ]; then
    tail -40 "$OUT/build.log"
    echo "build failed (rc ${RC[build]}); nothing else can run"
    exit 1
  fi
  echo "$SRC_HASH" >"$STAMP"
fi
# Import from the installed package, not from the source tree.
(cd /tmp && $PY -c "import tike_cuda, torch; print('tike_cuda with CUDA:', tike_cuda.built_with_cuda())")

if [ "$PHASE" != speed ]; then
  # The CUDA kernel tests first, on the GPU (their emulated twins run in CI), then the rest;
  # never -x: one failure must not hide the results after it. tests/test_distributed.py runs
  # NCCL there.
  run pytest_cuda 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py
  tail -15 "$OUT/pytest_cuda.log"
  run pytest 210 $PY -m pytest -q -p no:cacheprovider --ignore=tests/test_cuda_kernels.py tests
  tail -15 "$OUT/pytest.log"
  # Small cases of every kernel path (bench/sanitize_case.py), each tool in turn.
  run memcheck 70 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 $PY bench/sanitize_case.py
  run racecheck 70 "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 9 \
    --print-limit 20 $PY bench/sanitize_case.py
  run synccheck 60 "$SAN" --tool synccheck --error-exitcode 9 --print-limit 20 $PY bench/sanitize_case.py
  for t in memcheck racecheck synccheck; do tail -3 "$OUT/$t.log"; done
fi

if [ "$PHASE" != correct ]; then
  # Issue targets at N = 16,384 (with eager and torch.compile, and the sparse reference),
  # then the few-rows split path (N = 256) and N = 65,536 without the baselines.
  run targets 300 $PY bench/gpu_targets.py --out "$OUT/targets.csv"
  run targets_n256 60 $PY bench/gpu_targets.py --N 256 --no-baselines --no-sparse \
    --repeats 20 --out "$OUT/targets_n256.csv"
  run targets_n65536 150 $PY bench/gpu_targets.py --N 65536 --ks 16 --no-baselines --no-sparse \
    --out "$OUT/targets_n65536.csv"
fi

echo
echo "=== summary (rc: 0 ok, 124 timed out)"
for s in "${STEPS[@]}"; do printf '  %-15s rc=%s\n' "$s" "${RC[$s]}"; done
for f in pytest_cuda pytest; do
  [ -f "$OUT/$f.log" ] && grep -hE "passed|failed|error" "$OUT/$f.log" | tail -1
done
for t in memcheck racecheck synccheck; do
  [ -f "$OUT/$t.log" ] && grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$t.log"
done
for t in targets targets_n256 targets_n65536; do
  [ -f "$OUT/$t.log" ] && { echo; sed -n '/^N=/,$p' "$OUT/$t.log"; }
done
exit 0
