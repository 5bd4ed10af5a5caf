#!/usr/bin/env bash
# Train on the 8 GPUs of one node. Extra flags go to train.py, e.g. --strategy zigzag.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast (NVLS) off: not every fabric supports it, and the attention does not need it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec torchrun --standalone --nproc_per_node 8 launch/train.py "$@"
