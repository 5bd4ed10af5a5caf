"""Collectives over the sequence axis, for NCCL and gloo alike."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_seq(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def reduce_scatter_seq(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's equal slice along ``dim``.

    NCCL has a native reduce-scatter; gloo has none, so it all-reduces and slices (correct, more bytes).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if dist.get_backend(group) == "nccl":
        chunks = [c.contiguous() for c in x.chunk(world, dim)]
        out = torch.empty_like(chunks[rank])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x.chunk(world, dim)[rank].contiguous()
