"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards, full-sequence
entmax attention on one device per head share, all-to-all back.

    rank r holds tokens [r*S/P, (r+1)*S/P) of every head        (batch, S/P, heads, dim)
      -> all-to-all: the whole sequence of heads [r*H/P, (r+1)*H/P) (batch, S, heads/P, dim)
      -> adasplash_func (Triton kernels on CUDA)
      -> all-to-all back                                          (batch, S/P, heads, dim)

Communication per layer: 4 all-to-alls forward (q, k, v, out) and 4 backward, each moving
(P-1)/P of the local tensor; nothing depends on sparsity. Needs ``heads_q % P == 0``.

GQA/MQA: key/value heads are split like query heads when ``heads_kv % P == 0``; when
``P % heads_kv == 0`` each key/value head is sent to the P / heads_kv ranks whose query heads use
it (gradients of the copies add up in the backward).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..checks import HeadAlpha
from ..comm.all_to_all import heads_to_seq, seq_to_heads
from ..functional import adasplash_func
from .validation import validated_self_attention


def kv_copies(heads_q: int, heads_kv: int, degree: int) -> int:
    """How many ranks receive each key/value head: 1 when ``heads_kv % degree == 0`` (split), else
    ``degree // heads_kv`` when ``degree % heads_kv == 0`` (replicated). Raises ValueError otherwise
    or when ``heads_q % degree != 0``."""
    if heads_q % degree:
        raise ValueError(f"Ulysses needs heads of q divisible by the group size: heads_q={heads_q}, Ulysses group "
                         f"size {degree} (the world size unless a group is given)")
    if heads_kv % degree == 0:
        return 1
    if degree % heads_kv == 0:
        return degree // heads_kv
    raise ValueError(f"Ulysses needs heads of k and v divisible by the group size, or the group size divisible "
                     f"by them: heads_kv={heads_kv}, Ulysses group size {degree} (the world size unless a group "
                     "is given)")


def scatter_heads(q, k, v, group, copies: int):
    """Sequence shards -> the whole (group-local) sequence of this rank's head share.

    q: (batch, seqlen_local, heads_q, dim) -> (batch, seqlen_local * P, heads_q / P, dim)
    k, v: (batch, seqlen_local, heads_kv, dim) -> (batch, seqlen_local * P, heads_kv * copies / P, dim)
    """
    if copies > 1:
        k, v = (x.repeat_interleave(copies, dim=2) for x in (k, v))
    return seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group)


def local_heads_alpha(alpha: HeadAlpha, local_heads: int, group) -> HeadAlpha:
    """The alpha of this rank's share of the query heads after ``scatter_heads`` (rank r holds
    heads [r * local_heads, (r + 1) * local_heads)); its gradient reaches only those heads."""
    start = dist.get_rank(group) * local_heads
    return alpha.for_heads(start, start + local_heads)


def gather_heads(out, group):
    """(batch, seqlen_local * P, heads_q / P, dim) -> (batch, seqlen_local, heads_q, dim)."""
    return heads_to_seq(out, group)


def ulysses_adasplash_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float = 1.5,
                           causal: bool = True, softmax_scale: float | None = None, group=None,
                           window_size: tuple[int, int] = (-1, -1), sink_tokens: int = 0) -> torch.Tensor:
    """Entmax attention over a sequence sharded contiguously across ``group`` (default: world).

    Args:
        q: (batch, seqlen_local, heads_q, head_dim): rank r holds tokens ``[r*S/P, (r+1)*S/P)``;
            ``heads_q % P == 0``.
        k, v: (batch, seqlen_local, heads_kv, head_dim), the same tokens; ``heads_kv % P == 0`` or
            ``P % heads_kv == 0`` (see the module docstring).
        alpha, causal, softmax_scale, window_size, sink_tokens: as in
            :func:`ring_adasplash.adasplash_func` (over global positions; every rank must pass the
            same values).
    Returns:
        (batch, seqlen_local, heads_q, head_dim): this rank's rows of the full-sequence result.
    """
    degree = dist.get_world_size(group)

    def head_checks():
        return {"ulysses_degree": degree}, kv_copies(q.shape[2], k.shape[2], degree)

    checked = validated_self_attention(q, k, v, alpha, softmax_scale, causal, [group], head_checks,
                                       window_size=window_size, sink_tokens=sink_tokens)
    q_h, k_h, v_h = scatter_heads(q, k, v, group, copies=checked.extra)
    out = adasplash_func(q_h, k_h, v_h, local_heads_alpha(checked.alpha, q_h.shape[2], group), causal,
                         checked.softmax_scale, window_size=checked.window_size, sink_tokens=checked.sink_tokens)
    return gather_heads(out, group)
