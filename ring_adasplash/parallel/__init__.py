"""Sequence-parallel strategies, one module each; all take local shards (batch, seqlen_local, heads, head_dim)."""
from . import layouts
from .allgather import allgather_adasplash_func
from .kv_sharded import kv_sharded_adasplash_func
from .ring import ring_adasplash_func, ring_adasplash_varlen_func, zigzag_ring_adasplash_func
from .ulysses import ulysses_adasplash_func
from .usp import UspMesh, build_usp_groups, usp_adasplash_func, usp_positions, usp_shard, usp_unshard

__all__ = ["allgather_adasplash_func", "kv_sharded_adasplash_func", "layouts", "ring_adasplash_func",
           "ring_adasplash_varlen_func", "zigzag_ring_adasplash_func"]
__all__ += ["UspMesh", "build_usp_groups", "ulysses_adasplash_func", "usp_adasplash_func", "usp_positions",
            "usp_shard", "usp_unshard"]
