"""ring-adasplash: exact, differentiable alpha-entmax (sparse) attention on one GPU or many.

Every public function is exported here: the single-device ones (``adasplash_func``,
``adasplash_varlen_func``, ``AdaSplashAttention``), the AdaSplash drop-in (``adasplash``, AdaSplash's
(batch, heads, seqlen, head_dim) layout), entmax over any tensor (``entmax``, ``entmax15``,
``sparsemax``) and the sequence-parallel ones from ``ring_adasplash.parallel``. Importing the package does not need an initialised process group.
"""
from . import parallel, telemetry
from .adasplash_compat import adasplash
from .checks import DeviceAlpha
from .config import AttentionConfig, ParallelAttention
from .entmax_function import entmax, entmax15, sparsemax
from .functional import AdaSplashAttention, AttentionStats, adasplash_func, adasplash_varlen_func
from .kernels.block_mask import BlockMask
from .parallel import (
    allgather_adasplash_func,
    build_usp_groups,
    kv_sharded_adasplash_func,
    ring_adasplash_func,
    ring_adasplash_varlen_func,
    ulysses_adasplash_func,
    usp_adasplash_func,
    zigzag_ring_adasplash_func,
)

__all__ = [
    "DeviceAlpha",
    "AdaSplashAttention",
    "AttentionStats",
    "AttentionConfig",
    "ParallelAttention",
    "BlockMask",
    "adasplash",
    "adasplash_func",
    "adasplash_varlen_func",
    "allgather_adasplash_func",
    "build_usp_groups",
    "entmax",
    "entmax15",
    "kv_sharded_adasplash_func",
    "parallel",
    "ring_adasplash_func",
    "ring_adasplash_varlen_func",
    "sparsemax",
    "telemetry",
    "ulysses_adasplash_func",
    "usp_adasplash_func",
    "zigzag_ring_adasplash_func",
]
__version__ = "0.1.0"
