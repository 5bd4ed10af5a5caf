#!/usr/bin/env bash
# Train across nodes: run this once on every node with the same MASTER_ADDR and MASTER_PORT
# (an address and port of node 0), NNODES, and this node's NODE_RANK. Extra flags go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR}" "${MASTER_PORT:=29500}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-ring-adasplash}" \
    launch/train.py "$@"
