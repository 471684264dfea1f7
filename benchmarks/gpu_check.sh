#!/usr/bin/env bash
# The one prepared GPU run (see benchmarks/gpu_check.py): build for sm_90, CUDA tests file by file, GPU
# benchmarks family by family, at most 8 files in OUTDIR, all within 6 minutes (a rerun within 3).
#   benchmarks/gpu_check.sh OUTDIR [--rerun-failed PREVIOUS_JSON] [--dry] [--total S]
# GPU_CHECK_DRY=1 runs it on the CPU (no build, small limits), as CI does on every run.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
