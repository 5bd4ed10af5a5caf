"""Ending a distributed process without the teardown race of PyTorch's gloo backend."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist


def shutdown(exit_code: int = 0) -> None:
    """Destroy the process group, flush, and end the process with ``exit_code`` at once.

    On CPU (gloo) with torch 2.13, about one run in ten to twenty of a two-rank job aborted after
    its last line ("terminate called without an active exception", SIGABRT, rc 1), also with no
    collective after a plain local backward: gloo's worker threads can still hold tensors while
    the interpreter finalizes. Ending with ``os._exit`` after the process group is destroyed skips
    that finalization. Call it as the last line of a script's main (not from library code).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
