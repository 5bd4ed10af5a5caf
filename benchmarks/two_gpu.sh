#!/usr/bin/env bash
# The two-GPU runs of benchmarks/RESULTS.md ("Two H200") at the current commit, in parts that each
# fit a ten-minute slot; every report goes to benchmarks/results (or REPORT_OUT).
#
#   bash benchmarks/two_gpu.sh                  # every part, on the two GPUs of this node
#   PARTS="window million" bash benchmarks/two_gpu.sh
#   SMOKE=1 bash benchmarks/two_gpu.sh          # no GPU: the same parts, tiny, on two gloo ranks
#
# Parts:
#   strategies  ring, zigzag, all-gather, Ulysses, 2D (usp2x1) and PyTorch context parallel against
#               one GPU, 64K-256K tokens, on four inputs: structured amp 1.5 and 2.0, the dense-ish
#               structured amp 1.0, the scattered family (efficiency, bytes, peak memory)
#   window      a 4K window at 256K tokens: ring and zigzag against one GPU and FlexAttention with
#               the same window (PyTorch's context parallel takes no window)
#   million     1M and 4M tokens, fwd+bwd, zigzag (PyTorch context parallel at 1M): time and peak
#               memory per GPU
#   packed      packed documents through the ring (ring_adasplash_varlen_func) against the same
#               documents as a batch, 512 to 32K tokens a document, 32K in all
#   check       every strategy against the one-GPU result at 128K tokens in bf16
#   deepspeed   launch/deepspeed.sh, the DeepSpeed engine and its Ulysses attention (skipped where
#               deepspeed does not import)
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${REPORT_OUT:-benchmarks/results}
PARTS=${PARTS:-strategies window million packed check deepspeed}
RUN=(python3 -m torch.distributed.run --standalone --nproc_per_node 2)  # torchrun
if [ -n "${SMOKE:-}" ]; then
  SIZE=(--device cpu --heads 2 --head-dim 16 --dtype fp32)
  SEQLENS=512 WINDOW_SEQLEN=512 WINDOW=128 MILLION=1024 FOUR_MILLION=2048 CHECK_SEQLEN=512
  PACKED_TOTAL=1024 DOC_LENS=256,1024
  TIMING=(--warmup 0 --iters 1)
  export CUDA_VISIBLE_DEVICES=""
else
  SIZE=(--heads 16 --head-dim 128 --dtype bf16)
  SEQLENS=65536,131072,262144 WINDOW_SEQLEN=262144 WINDOW=4096 MILLION=1048576 FOUR_MILLION=4194304
  CHECK_SEQLEN=131072 PACKED_TOTAL=32768 DOC_LENS=512,2048,8192,32768
  TIMING=(--warmup 1 --iters 3)
fi
git rev-parse --short HEAD

for part in $PARTS; do
  echo "== $part"
  case $part in
    strategies)
      for input in "structured 1.5" "structured 2.0" "structured 1.0" "scattered 1.0"; do
        set -- $input
        "${RUN[@]}" benchmarks/bench_distributed.py "${SIZE[@]}" "${TIMING[@]}" --seqlens "$SEQLENS" \
          --family "$1" --amp "$2" --impls onegpu,sdpa1,ring,zigzag,allgather,ulysses,usp2x1,torch_cp --out "$OUT"
      done ;;
    window)
      "${RUN[@]}" benchmarks/bench_distributed.py "${SIZE[@]}" "${TIMING[@]}" --seqlens "$WINDOW_SEQLEN" \
        --window "$WINDOW" --amp 1.0 --impls onegpu,flex1,ring,zigzag --out "$OUT" ;;
    million)  # PyTorch context parallel's dense fwd+bwd at 4M would take several minutes by itself
      "${RUN[@]}" benchmarks/bench_distributed.py "${SIZE[@]}" --seqlens "$MILLION" --amp 1.5 \
        --impls zigzag,torch_cp --modes fwdbwd --warmup 0 --iters 1 --out "$OUT"
      "${RUN[@]}" benchmarks/bench_distributed.py "${SIZE[@]}" --seqlens "$FOUR_MILLION" --amp 1.5 \
        --impls zigzag --modes fwdbwd --warmup 0 --iters 1 --out "$OUT" ;;
    packed)
      "${RUN[@]}" benchmarks/bench_ring_packed.py "${SIZE[@]}" "${TIMING[@]}" --total "$PACKED_TOTAL" \
        --doc-lens "$DOC_LENS" --amp 1.0 --out "$OUT" ;;
    check)
      "${RUN[@]}" benchmarks/check_strategies.py "${SIZE[@]}" --seqlen "$CHECK_SEQLEN" --amp 1.5 ;;
    deepspeed)
      if python3 -c "import deepspeed" 2> /dev/null; then
        NUM_GPUS=2 NPROC=2 launch/deepspeed.sh --steps 20
      else
        echo "deepspeed does not import: skipped"
      fi ;;
    *)
      echo "unknown part '$part'; parts: strategies window million packed check deepspeed" >&2
      exit 2 ;;
  esac
done
