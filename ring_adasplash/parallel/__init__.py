"""Sequence-parallel strategies, one module each; all take local shards (batch, seqlen_local, heads, head_dim)."""
from . import layouts
from .allgather import allgather_adasplash_func
from .kv_sharded import kv_sharded_adasplash_func
from .ring import ring_adasplash_func, ring_adasplash_varlen_func, zigzag_ring_adasplash_func

__all__ = ["allgather_adasplash_func", "kv_sharded_adasplash_func", "layouts", "ring_adasplash_func",
           "ring_adasplash_varlen_func", "zigzag_ring_adasplash_func"]
