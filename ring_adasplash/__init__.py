"""ring-adasplash: exact, differentiable alpha-entmax (sparse) attention on one GPU or many."""
from .functional import AdaSplashAttention, adasplash_func, adasplash_varlen_func
from .kernels.block_mask import BlockMask

__all__ = ["AdaSplashAttention", "BlockMask", "adasplash_func", "adasplash_varlen_func"]
__version__ = "0.1.0"
