#!/usr/bin/env bash
# The one prepared GPU run: build in place for the GPU present, run the CUDA tests, run the GPU
# benchmarks, write JSON (GPU name, versions, date) and logs to OUTDIR, print a short table last.
# Budget: at most about 11 minutes on one H200 with torch 2.11 (no network). Usage: benchmarks/gpu_check.sh OUTDIR
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
timeout 120 $py -m pytest -q -x -m cuda tests 2>&1 | tee "$out/tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}

# One run per family, each with its own time limit and JSON, so a slow family (torch.compile of a
# ResNet-50 takes a minute) cannot cost the others their results.
bench_rc=0
bench() {
  local name=$1 limit=$2; shift 2
  step "GPU benchmarks: $name"
  timeout "$limit" $py -m fastbb --device cuda --min-time 0.3 --only "$@" --json "$out/bench_gpu_$name.json" \
    >"$out/bench_$name.log" 2>&1 || bench_rc=1
}
bench detection 60 nms decode retinanet
bench focal_loss 45 focal
bench fpn 90 upsample fpn_merge FPN FeaturePyramid
bench conv_bn_relu 120 conv_bn ResNet

step "summary"
echo "tests exit code: $tests_rc; benchmarks exit code: $bench_rc"
for log in "$out"/bench_*.log; do sed -n '/^fastbb benchmarks on .* threads/,$p' "$log"; done
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
