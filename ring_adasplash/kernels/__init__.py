"""Local kernels: one query block against one key block. No autograd, no torch.distributed.

Two backends implement one protocol (``backend.Backend``): ``triton_backend`` for CUDA tensors and
``torch_blockwise`` for everything else, float64 included; ``backend_for`` picks one. The pass
schedule that both serve is ``algorithm.py``.
"""
from __future__ import annotations

from .backend import Backend, Problem, backend_for
from .entmax_spec import EntmaxSpec

__all__ = ["Backend", "EntmaxSpec", "Problem", "backend_for"]
