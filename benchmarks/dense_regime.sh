#!/usr/bin/env bash
# The dense-regime comparison at the current commit: ours against flash SDPA and AdaSplash side by
# side, forward and fwd+bwd (bf16, causal, batch 1, 16 heads, alpha 1.5), on each input family at
# 8K, 32K, 64K and 128K tokens, D 64 and 128. One bench_kernels.py process per part (run them in
# separate slots where time is short); the reports go to benchmarks/results (or REPORT_OUT).
#
#   bash benchmarks/dense_regime.sh
#   PARTS="scattered mixed" bash benchmarks/dense_regime.sh
#   NO_ADASPLASH=1 bash benchmarks/dense_regime.sh   # without AdaSplash (package missing)
#   SMOKE=1 bash benchmarks/dense_regime.sh          # no GPU: the same parts, tiny, on the CPU
#
# Parts:
#   structured   the local family at amp 1.0 (moderately sparse: 8-41% of the tiles zero at 8K-32K)
#   scattered    each row's nonzero keys scattered over the whole row (no locality)
#   mixed        half the heads structured at amp 2.0, half scattered, in one call
#   sparse       the local family at amp 2.0 (at least 95% of the tiles zero), from 32K
#   profile      where the forward's time goes on the dense rows (profile_candidates.py)
#   captured     q, k, v of the example model (launch/train.py, 2 layers, 4 heads of D 64) once it
#                has learned recall at 8K tokens (curriculum from 64 tokens), one row a layer;
#                the training's log beside the report, the capture at CAPTURE_PATH
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${REPORT_OUT:-benchmarks/results}
PARTS=${PARTS:-structured scattered mixed sparse profile captured}
CAPTURE_PATH=${CAPTURE_PATH:-${TMPDIR:-/tmp}/ring_adasplash_captured_qkv.pt}
IMPLS=ours,sdpa,adasplash
if [ -n "${SMOKE:-}" ]; then
  COMMON=(--device cpu --heads 2 --batch 1 --dtype fp32 --modes fwd,fwdbwd --warmup-ms 0 --rep-ms 0)
  DENSE=256:16:1.0,512:16:1.0 SPARSE=512:16:2.0 PROFILE=(--device cpu --seqlen 256 --head-dim 16 --heads 2
                                                       --repeats 1)
  TRAIN=(--seqlen 256 --layers 2 --d-model 32 --heads 2 --batch 2 --curriculum 64:2 --steps 2 --log-every 100)
  CAPTURED=(--heads 2 --batch 2 --rows 256:16:0,256:16:1)
  IMPLS=ours,sdpa
  export CUDA_VISIBLE_DEVICES=""
else
  COMMON=(--heads 16 --batch 1 --dtype bf16 --modes fwd,fwdbwd --warmup-ms 25 --rep-ms 100 --adasplash-precompile 16)
  DENSE=8192:64:1.0,8192:128:1.0,32768:64:1.0,32768:128:1.0,65536:64:1.0,65536:128:1.0,131072:64:1.0,131072:128:1.0
  SPARSE=32768:64:2.0,32768:128:2.0,65536:128:2.0,131072:128:2.0
  PROFILE=(--seqlen 32768 --head-dim 64 --repeats 10)
  # this model's recall reached 1.000 within 300 steps at 64 tokens, 200 at 1024 and 100 at 8K on one H100
  # (benchmarks/HISTORY.md, "Recall learned at 8K"): each stage here has twice that
  TRAIN=(--seqlen 8192 --layers 2 --d-model 256 --heads 4 --lr 1e-3 --batch 8 --curriculum 64:600,1024:400
         --steps 200 --log-every 100)
  CAPTURED=(--heads 4 --batch 4 --rows 8192:64:0,8192:64:1)
fi
[ -z "${NO_ADASPLASH:-}" ] || IMPLS=ours,sdpa
git rev-parse --short HEAD 2> /dev/null || true

for part in $PARTS; do
  echo "== $part"
  case $part in
    structured|scattered|mixed)
      python3 benchmarks/bench_kernels.py "${COMMON[@]}" --impls "$IMPLS" --family "$part" --rows "$DENSE" \
        --out "$OUT" ;;
    sparse)
      python3 benchmarks/bench_kernels.py "${COMMON[@]}" --impls "$IMPLS" --family structured --rows "$SPARSE" \
        --out "$OUT" ;;
    profile)
      for family in structured scattered; do
        # on the CPU (SMOKE) its Triton kernels run interpreted
        ${SMOKE:+env TRITON_INTERPRET=1 RING_ADASPLASH_BACKEND=triton} python3 benchmarks/profile_candidates.py \
          "${PROFILE[@]}" --family "$family" --amp 1.0
      done ;;
    captured)
      (cd launch && python3 -m torch.distributed.run --standalone --nproc_per_node 1 train.py "${TRAIN[@]}" \
        --capture "$CAPTURE_PATH") | tee "$OUT/captured_train_$(date +%Y%m%d-%H%M%S).log"
      python3 benchmarks/bench_kernels.py "${COMMON[@]}" "${CAPTURED[@]}" --impls "$IMPLS" --family captured \
        --captured "$CAPTURE_PATH" --out "$OUT" ;;
    *)
      echo "unknown part '$part'; parts: structured scattered mixed sparse profile captured" >&2
      exit 2 ;;
  esac
done
