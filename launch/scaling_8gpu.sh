#!/usr/bin/env bash
# One node of 8 GPUs: every strategy checked against one GPU, then weak and strong scaling at
# P = 1, 2, 4, 8 next to PyTorch context parallel (reports in benchmarks/results/).
#
#   bash launch/scaling_8gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="torchrun --standalone"
BENCH="benchmarks/bench_distributed.py --heads 16 --head-dim 128"
OURS=onegpu,sdpa1,ring,zigzag,allgather,ulysses,torch_cp

# bf16, 64K tokens: ring, zigzag, allgather, Ulysses, DeepSpeed, 2D as 2x4 and 4x2
$RUN --nproc_per_node 8 benchmarks/check_strategies.py --seqlen 65536 --amp 1.5
$RUN --nproc_per_node 8 benchmarks/check_strategies.py --seqlen 65536 --amp 1.0

for AMP in 1.5 1.0; do
  # weak scaling: 8K, 32K and 128K tokens per GPU
  $RUN --nproc_per_node 1 $BENCH --amp $AMP --seqlens 8192,32768,131072 --impls $OURS
  $RUN --nproc_per_node 2 $BENCH --amp $AMP --seqlens 16384,65536,262144 --impls $OURS
  $RUN --nproc_per_node 4 $BENCH --amp $AMP --seqlens 32768,131072,524288 --impls $OURS,usp2x2
  $RUN --nproc_per_node 8 $BENCH --amp $AMP --seqlens 65536,262144,1048576 --impls $OURS,usp2x4,usp4x2
  # strong scaling: the same 256K tokens on 1, 2, 4 and 8 GPUs
  for P in 1 2 4 8; do
    $RUN --nproc_per_node $P $BENCH --amp $AMP --seqlens 262144 --impls ring,zigzag,ulysses,torch_cp
  done
done
