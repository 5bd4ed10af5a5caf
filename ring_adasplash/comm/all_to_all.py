"""Differentiable all-to-all over one tensor axis pair: the Ulysses exchange between a sequence
shard of every head and the whole sequence of a share of the heads.

    seq_to_heads(x, group):  (batch, seqlen_local, heads, dim) -> (batch, seqlen_local * P, heads / P, dim)
    heads_to_seq(y, group):  the inverse

Built on the functional collective ``all_to_all_single_autograd`` (native all-to-all on NCCL and
on gloo for CPU tensors): its backward is the reverse all-to-all, and ``torch.compile`` traces it
into the graph instead of breaking on it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into P equal chunks along ``scatter_dim`` (chunk j goes to rank j) and
    concatenate the chunks received from ranks 0..P-1 along ``gather_dim``. Differentiable:
    the gradient goes back by the all-to-all with the two axes swapped."""
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: axis {scatter_dim} of shape {tuple(x.shape)} must be divisible by the "
                         f"group size {world}")
    send = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()
    recv = wait_tensor(all_to_all_single_autograd(send, None, None, dist.group.WORLD if group is None else group))
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def seq_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """(batch, seqlen_local, heads, dim) -> (batch, seqlen_local * P, heads / P, dim): rank r gets
    heads ``[r * heads / P, (r + 1) * heads / P)`` of the sequence shards of ranks 0..P-1 in order."""
    return x if dist.get_world_size(group) == 1 else all_to_all(x, group, 2, 1)


def heads_to_seq(y: torch.Tensor, group=None) -> torch.Tensor:
    """(batch, seqlen_local * P, heads / P, dim) -> (batch, seqlen_local, heads, dim); inverse of
    :func:`seq_to_heads`."""
    return y if dist.get_world_size(group) == 1 else all_to_all(y, group, 1, 2)
