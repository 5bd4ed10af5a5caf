"""2D sequence parallelism (USP): Ulysses all-to-all inside small groups, ring attention across them.

Mesh: U * R ranks, ``build_usp_groups(U, R)``. One rule places them: global rank
``g = base + ring_rank * U + ulysses_rank`` with ``base`` a multiple of U * R (several meshes, e.g.
data-parallel replicas, sit side by side). Ulysses groups are consecutive ranks, so with
U <= 8 dividing 8 the all-to-all stays inside a node of 8 GPUs; ring groups are strided by U.

Token layout of a global sequence of length S:
    1. it is cut into R ring shards with ``ring_layout`` over R ranks (``parallel.layouts``;
       zigzag: ring shard i = chunks i and 2R-1-i of 2R);
    2. ring shard i is cut contiguously into U pieces; rank (ring_rank=i, ulysses_rank=u) holds
       piece u, S / (U R) tokens (``usp_positions`` lists them, ``usp_shard``/``usp_unshard`` apply it).
The Ulysses all-to-all then gives every rank of Ulysses group i the whole ring shard i, in the
order the ring expects, for its heads; the ring runs over the ranks holding the same heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checks import HeadAlpha
from ..comm import RingComm
from ..functional import adasplash_func
from . import layouts
from .ring import RingAttention, _positional_plan
from .ulysses import gather_heads, kv_copies, local_heads_alpha, scatter_heads
from .validation import validated_self_attention


@dataclass(frozen=True)
class UspMesh:
    """This rank's place in a U x R mesh. ``rank = ring_rank * U + ulysses_rank``."""

    ulysses_rank: int = 0
    ulysses_degree: int = 1
    ring_rank: int = 0
    ring_degree: int = 1

    @classmethod
    def from_groups(cls, ulysses_group=None, ring_group=None) -> "UspMesh":
        """From the groups of ``build_usp_groups``; a None group means degree 1 on that axis."""
        def place(group):
            return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))

        return cls(*place(ulysses_group), *place(ring_group))

    @property
    def rank(self) -> int:
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank

    @property
    def size(self) -> int:
        return self.ring_degree * self.ulysses_degree

    def at(self, rank: int) -> "UspMesh":
        """The place of another rank (``0 <= rank < size``) of the same mesh."""
        return UspMesh(rank % self.ulysses_degree, self.ulysses_degree, rank // self.ulysses_degree, self.ring_degree)


def build_usp_groups(ulysses_degree: int, ring_degree: int):
    """(ulysses_group, ring_group) of this rank; every rank of the world must call it.

    The world size must be a multiple of ``ulysses_degree * ring_degree``; see the module
    docstring for the rank rule. Groups of size 1 are real groups too.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if ulysses_degree < 1 or ring_degree < 1 or world % (ulysses_degree * ring_degree):
        raise ValueError(f"world size {world} must be a multiple of ulysses_degree * ring_degree; got "
                         f"ulysses_degree={ulysses_degree}, ring_degree={ring_degree}")
    u, r = ulysses_degree, ring_degree
    bases = range(0, world, u * r)
    ulysses_ranks = [[base + i * u + j for j in range(u)] for base in bases for i in range(r)]
    ring_ranks = [[base + i * u + j for i in range(r)] for base in bases for j in range(u)]
    mine = []
    for all_groups in (ulysses_ranks, ring_ranks):
        for ranks in all_groups:
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks:
                found = group
        mine.append(found)
    return tuple(mine)


def usp_positions(seqlen: int, mesh: UspMesh, ring_layout: str = "zigzag", device=None) -> torch.Tensor:
    """(seqlen / mesh.size,) int64 global positions of this rank's tokens, in local order (RoPE)."""
    if ring_layout not in layouts.LAYOUTS:
        raise ValueError(f"ring_layout must be one of {layouts.LAYOUTS}; got {ring_layout!r}")
    layout = ring_layout if mesh.ring_degree > 1 else "contiguous"  # one ring shard: both keep the order
    ring_shard = layouts.positions(layout, seqlen, mesh.ring_rank, mesh.ring_degree, device)
    if ring_shard.numel() % mesh.ulysses_degree:
        raise ValueError(f"sequence length {seqlen} must be divisible by ring_degree * ulysses_degree "
                         f"({mesh.ring_degree} * {mesh.ulysses_degree})")
    return ring_shard.chunk(mesh.ulysses_degree)[mesh.ulysses_rank]


def usp_shard(x: torch.Tensor, mesh: UspMesh, ring_layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's shard of a global tensor ``x`` along ``dim`` (the sequence axis)."""
    return x.index_select(dim, usp_positions(x.shape[dim], mesh, ring_layout, x.device))


def usp_unshard(shards, mesh: UspMesh, ring_layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The global tensor from every rank's shard: a list in mesh rank order (``UspMesh.rank``)."""
    shards = list(shards)
    if len(shards) != mesh.size:
        raise ValueError(f"usp_unshard needs one shard per rank of the mesh ({mesh.size}); got {len(shards)}")
    seqlen = sum(s.shape[dim] for s in shards)
    order = torch.cat([usp_positions(seqlen, mesh.at(r), ring_layout, shards[0].device) for r in range(mesh.size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seqlen, device=order.device)
    return torch.cat(shards, dim).index_select(dim, inverse)


@torch.compiler.disable  # point-to-point exchanges inside: compiled graphs break here
def _ring_attention(q, k, v, alpha: HeadAlpha, causal: bool, scale: float, ring_group, ring_layout: str,
                    window_size: tuple, sink_tokens: int):
    """Ring attention over ``ring_group`` of whole ring shards (batch, S / R, heads_share, dim)."""
    plan = _positional_plan(RingComm(ring_group), ring_layout, q.shape[1] * dist.get_world_size(ring_group), causal,
                            q.device, name=f"usp-{ring_layout}", window_size=window_size, sink_tokens=sink_tokens)
    return RingAttention.apply(q, k, v, alpha, alpha.tensor, scale, plan)


def usp_adasplash_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float = 1.5, causal: bool = True,
                       softmax_scale: float | None = None, ulysses_group=None, ring_group=None,
                       ring_layout: str = "zigzag", window_size: tuple[int, int] = (-1, -1),
                       sink_tokens: int = 0) -> torch.Tensor:
    """Entmax attention over a sequence sharded across a Ulysses x ring mesh.

    Args:
        q: (batch, seqlen_local, heads_q, head_dim), this rank's tokens in the USP layout (module
            docstring); ``heads_q % U == 0``.
        k, v: (batch, seqlen_local, heads_kv, head_dim), the same tokens; ``heads_kv % U == 0`` or
            ``U % heads_kv == 0``.
        ulysses_group, ring_group: from :func:`build_usp_groups`. None means degree 1 on that axis
            (None, None is one device), unlike ``group=None`` of the 1D strategies (the world).
        ring_layout: "zigzag" (balanced causal work) or "contiguous", across the ring groups.
        alpha, causal, softmax_scale, window_size, sink_tokens: as in
            :func:`ring_adasplash.adasplash_func` (over global positions); the same on every rank.
    Returns:
        (batch, seqlen_local, heads_q, head_dim): this rank's rows of the full-sequence result.
    """
    mesh = UspMesh.from_groups(ulysses_group, ring_group)

    def mesh_checks():
        copies = kv_copies(q.shape[2], k.shape[2], mesh.ulysses_degree)
        usp_positions(q.shape[1] * mesh.size, mesh, ring_layout)
        description = {"ulysses_degree": mesh.ulysses_degree, "ring_degree": mesh.ring_degree,
                       "ring_layout": ring_layout}
        return description, copies

    groups = [g for g in (ulysses_group, ring_group) if g is not None]
    checked = validated_self_attention(q, k, v, alpha, softmax_scale, causal, groups, mesh_checks,
                                       window_size=window_size, sink_tokens=sink_tokens)
    window = {"window_size": checked.window_size, "sink_tokens": checked.sink_tokens}
    alpha, scale = checked.alpha, checked.softmax_scale
    if mesh.ulysses_degree > 1:
        q, k, v = scatter_heads(q, k, v, ulysses_group, checked.extra)
        alpha = local_heads_alpha(alpha, q.shape[2], ulysses_group)
    if mesh.ring_degree > 1:
        out = _ring_attention(q, k, v, alpha, causal, scale, ring_group, ring_layout, **window)
    else:  # one ring shard: the whole sequence, in order for either layout
        out = adasplash_func(q, k, v, alpha, causal, scale, **window)
    return gather_heads(out, ulysses_group) if mesh.ulysses_degree > 1 else out
