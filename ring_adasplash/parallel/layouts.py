"""How a global sequence is cut across the ranks of a sequence-parallel group.

``contiguous``: rank r holds tokens ``[r * S / P, (r + 1) * S / P)``.
``zigzag``: the sequence is cut into 2P equal chunks; rank r holds chunk r followed by chunk
2P - 1 - r, so every rank gets the same amount of causal work.
"""
from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def _check(layout: str, seqlen: int, world_size: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seqlen % parts:
        raise ValueError(f"sequence length {seqlen} must be divisible by {parts} for the {layout} layout "
                         f"over {world_size} ranks")


def positions(layout: str, seqlen: int, rank: int, world_size: int, device=None) -> torch.Tensor:
    """Global token positions (int64) held by ``rank``, in local order (use them for RoPE)."""
    _check(layout, seqlen, world_size)
    if layout == "contiguous":
        local = seqlen // world_size
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    chunk = seqlen // (2 * world_size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard(x: torch.Tensor, layout: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a global tensor ``x`` along ``dim`` (the sequence axis)."""
    return x.index_select(dim, positions(layout, x.shape[dim], rank, world_size, x.device))


def unshard(shards, layout: str, world_size: int, dim: int = 1) -> torch.Tensor:
    """The global tensor from every rank's shard (a list in rank order, e.g. from all_gather)."""
    shards = list(shards)
    if len(shards) != world_size:
        raise ValueError(f"unshard needs one shard per rank ({world_size}); got {len(shards)}")
    seqlen = sum(s.shape[dim] for s in shards)
    order = torch.cat([positions(layout, seqlen, r, world_size, shards[0].device) for r in range(world_size)])
    gathered = torch.cat(shards, dim)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seqlen, device=order.device)
    return gathered.index_select(dim, inverse)
