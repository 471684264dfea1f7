#!/usr/bin/env bash
# The one prepared GPU run: build in place for the GPU present, run the CUDA tests, run the GPU
# benchmarks, write JSON (GPU name, versions, date) and logs to OUTDIR, print a short table last.
# Budget: 8 minutes on one H200 with torch 2.11 (no network). Usage: benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
start=$SECONDS
step() { echo "=== $* ($((SECONDS - start)) s)"; }

step "build (sm_90 only, to save time)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
FASTBB_CUDA_ARCHS=${FASTBB_CUDA_ARCHS:-9.0} FASTBB_REQUIRE_EXTENSION=1 MAX_JOBS=16 \
  timeout 240 $py -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { tail -n 40 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
$py -m fastbb info | tee "$out/info.txt"

step "CUDA tests"
timeout 150 $py -m pytest -q -x -m cuda tests 2>&1 | tee "$out/tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}

step "GPU benchmarks"
timeout 150 $py -m fastbb --device cuda --min-time 0.3 --json "$out/bench_gpu.json" >"$out/bench.log" 2>&1
bench_rc=$?

step "summary"
echo "tests exit code: $tests_rc; benchmarks exit code: $bench_rc"
sed -n '/^fastbb benchmarks on .* threads/,$p' "$out/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
