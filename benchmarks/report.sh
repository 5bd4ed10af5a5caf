#!/usr/bin/env bash
# The one-GPU report of benchmarks/RESULTS.md at the current commit: three rows of the structured
# inputs and two of the scattered ones (bf16, causal, batch 1, 16 heads, alpha 1.5), ours against
# SDPA (flash) and AdaSplash, forward and forward + backward, one process per family. It writes
# kernels_<timestamp>.md/.csv/.png into benchmarks/results (or REPORT_OUT); paste their tables under
# "One H200" (or the GPU it ran on) in RESULTS.md.
#
#   bash benchmarks/report.sh
#   NO_ADASPLASH=1 bash benchmarks/report.sh     # without AdaSplash (package missing, or to save
#                                                # its first-call tuning)
#   REPORT_OUT=/tmp/report bash benchmarks/report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IMPLS=ours,sdpa,adasplash
[ -z "${NO_ADASPLASH:-}" ] || IMPLS=ours,sdpa
# AdaSplash's autotuning configurations compiled in 16 processes first (adasplash_precompile.py)
COMMON=(--heads 16 --batch 1 --dtype bf16 --impls "$IMPLS" --modes fwd,fwdbwd --out "${REPORT_OUT:-benchmarks/results}"
        --adasplash-precompile 16)

git rev-parse --short HEAD
python3 benchmarks/bench_kernels.py "${COMMON[@]}" --family structured \
    --rows 8192:128:1.0,32768:64:1.0,32768:128:2.0 --warmup-ms 50 --rep-ms 200
python3 benchmarks/bench_kernels.py "${COMMON[@]}" --family scattered \
    --rows 8192:64:1.0,8192:128:1.0 --warmup-ms 50 --rep-ms 200
