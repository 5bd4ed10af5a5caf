"""A drop-in for AdaSplash's ``adasplash``: its layout, defaults and arguments, our exact kernels.

    from ring_adasplash import adasplash          # instead of: from adasplash import adasplash
    out = adasplash(q, k, v, alpha=1.5, is_causal=True, varlen=lengths)   # (batch, heads, seqlen, head_dim)

The tensors are taken as views in our layout (batch, seqlen, heads, head_dim), never copied.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_alpha
from .functional import adasplash_func, adasplash_varlen_func, empty_output


def _check_compat_args(q: Tensor, k: Tensor, v: Tensor, varlen: Tensor | None, niter) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (batch, heads, seqlen, head_dim), AdaSplash's layout; "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must have the same seqlen (dim 2 of (batch, heads, seqlen, head_dim)); got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if niter is not None and (not isinstance(niter, int) or niter < 1):
        raise ValueError(f"niter must be None or a positive int (it is not needed: tau is exact); got {niter!r}")
    if varlen is not None:
        if not isinstance(varlen, Tensor) or varlen.dim() != 1 or varlen.shape[0] != q.shape[0]:
            raise ValueError(f"varlen must be a 1-dim tensor of the batch's valid lengths, shape ({q.shape[0]},); "
                             f"got {getattr(varlen, 'shape', type(varlen).__name__)}")
        if varlen.dtype.is_floating_point or bool(((varlen < 0) | (varlen > q.shape[2])).any()):
            raise ValueError(f"varlen must hold integer lengths in [0, {q.shape[2]}] (the seqlen); got {varlen.tolist()}")


def adasplash(q: Tensor, k: Tensor, v: Tensor, alpha: float = 1.5, is_causal: bool = True, varlen: Tensor | None = None,
              niter: int | None = None) -> Tensor:
    """alpha-entmax attention with AdaSplash 0.2.2's interface.

    Args:
        q, k, v: (batch, heads, seqlen, head_dim), AdaSplash's layout; k and v may have fewer heads
            than q (GQA: heads_q a multiple of heads_kv).
        alpha: in (1, 2]. is_causal: query i sees keys j <= i (q and k have one length).
        varlen: optional (batch,) integer tensor of valid lengths: batch entry b uses its first
            ``varlen[b]`` tokens as queries and keys; its output rows from ``varlen[b]`` on are zero.
        niter: accepted for compatibility and unused: tau is computed exactly, with no iteration
            count to choose.
    Returns:
        (batch, heads, seqlen, head_dim) in q's dtype; softmax scale ``1 / sqrt(head_dim)``.
    """
    _check_compat_args(q, k, v, varlen, niter)
    alpha = check_alpha(alpha)
    as_ours = [t.transpose(1, 2) for t in (q, k, v)]  # (batch, seqlen, heads, head_dim) views
    if varlen is None:
        return adasplash_func(*as_ours, alpha=alpha, causal=is_causal).transpose(1, 2)
    batch, seqlen = q.shape[0], q.shape[2]
    lengths = varlen.to(device=q.device, dtype=torch.int64)
    valid = (torch.arange(seqlen, device=q.device)[None, :] < lengths[:, None]).flatten()
    rows = valid.nonzero().flatten()  # packed tokens, batch entry by batch entry
    if rows.numel() == 0:  # no valid token: zeros, still connected to the inputs for autograd
        return empty_output(q, k, v)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    packed = [t.flatten(0, 1).index_select(0, rows) for t in as_ours]  # (total, heads, head_dim)
    out = adasplash_varlen_func(*packed, cu_seqlens, cu_seqlens, longest, longest, alpha=alpha, causal=is_causal)
    full = out.new_zeros(batch * seqlen, *out.shape[1:]).index_copy(0, rows, out)
    return full.view(batch, seqlen, *out.shape[1:]).transpose(1, 2)
