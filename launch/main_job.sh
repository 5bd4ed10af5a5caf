#!/usr/bin/env bash
# The main job with all its set-up: installs the package (and the CPU build of torch where no torch
# is installed yet), then trains the example transformer on NPROC ranks (default 2): gloo on CPU,
# NCCL on GPUs. Extra arguments go to launch/train.py.
#
#   bash launch/main_job.sh
#   NPROC=8 bash launch/main_job.sh --strategy zigzag --seqlen 65536
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0
python3 -m pip install -e ".[bench]"
exec python3 -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" launch/train.py "$@"
