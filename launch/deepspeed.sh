#!/usr/bin/env bash
# DeepSpeed-Ulysses training of the entmax transformer: every rank holds a contiguous shard of the
# sequence; DeepSpeed's DistributedAttention swaps sequence shards for head shards around
# ring_adasplash's attention (ring_adasplash.integrations.deepspeed_distributed_attention).
#
#   launch/deepspeed.sh                          # all GPUs of this node (NUM_GPUS to limit)
#   NPROC=2 launch/deepspeed.sh --steps 50       # no GPU: 2 gloo ranks on CPU through torchrun
#
# Extra arguments go to launch/train.py. Heads (and key/value heads) must be a multiple of the
# number of ranks. launch/deepspeed_config.json (AdamW, bf16, ZeRO-1, clipping) is passed as
# --deepspeed_config, DeepSpeed's usual argument name: train.py then trains with a DeepSpeed engine.
# Batch size and learning-rate schedule stay train.py's flags; bf16 applies on GPUs only. The
# config's "torch_adam" picks torch's AdamW over DeepSpeed's FusedAdam, which is compiled on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=launch/deepspeed_config.json

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
  # --no_local_rank: ranks read LOCAL_RANK from the environment, as under torchrun
  exec deepspeed --num_gpus "$NUM_GPUS" --no_local_rank launch/train.py \
    --strategy deepspeed --deepspeed_config "$CONFIG" "$@"
else
  # DeepSpeed's launcher counts accelerators; on CPU torchrun starts the gloo ranks instead
  exec torchrun --standalone --nproc_per_node "${NPROC:-2}" launch/train.py \
    --strategy deepspeed --deepspeed_config "$CONFIG" "$@"
fi
