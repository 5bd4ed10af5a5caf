"""Local kernels: one query block against one key block. No autograd, no torch.distributed.

Two backends share one contract (see ``algorithm.py`` and ``torch_blockwise.py``):
``triton_backend`` for CUDA tensors and ``torch_blockwise`` for everything else. Set
``RING_ADASPLASH_BACKEND=triton`` to run the Triton kernels on CPU tensors under
``TRITON_INTERPRET=1`` (tests do), or ``=torch`` to force the PyTorch path.
"""
from __future__ import annotations

import os

from . import torch_blockwise


def backend_for(x):
    """The backend module for tensors on ``x.device``."""
    choice = os.environ.get("RING_ADASPLASH_BACKEND", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"RING_ADASPLASH_BACKEND must be one of auto, torch, triton; got {choice!r}")
    if choice == "triton" or (choice == "auto" and x.is_cuda):
        from . import triton_backend

        return triton_backend
    return torch_blockwise
