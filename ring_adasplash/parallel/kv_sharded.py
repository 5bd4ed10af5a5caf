"""The same queries on every rank, keys and values sharded (prefill or decode against a sharded
KV cache). Statistics are merged by all-reduce (max, then a sum of aligned histograms), refinement
sums and partial outputs by all-reduce sums: no ring, one collective per stage.

Order: the all-reduce merges, the autograd Function, the public function.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import telemetry
from ..checks import HeadAlpha, check_head_alpha, check_qkv, check_window, default_scale
from ..kernels import backend_for
from ..kernels.algorithm import LocalReduce, SingleBlock, entmax_backward, entmax_forward
from ..kernels.entmax_spec import alpha_gradient_in_shape, call_spec
from ..kernels.visibility import positional_visibility, windowed
from .validation import checked_on_groups, options_description


class AllReduceMerge(LocalReduce):
    """Merges across ranks whose key blocks differ and whose queries are the same: the row max by
    an all-reduce max; everything else (histograms, all taken against the global row max, fine
    sums, partial outputs, dq) by all-reduce sums."""

    complete = False

    def __init__(self, group):
        self.group = group

    def row_max(self, row_max: torch.Tensor) -> torch.Tensor:
        row_max = row_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        return row_max

    def sums(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        return t


class KVShardedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha: HeadAlpha, alpha_tensor, softmax_scale: float, vis, group):
        backend, merge = backend_for(q), AllReduceMerge(group)
        spec = call_spec(alpha.values, alpha.table(q.shape[2], q.device))  # a DeviceAlpha's table, else None
        fwd = entmax_forward(backend, q, SingleBlock(k, v, vis), spec, softmax_scale, merge)
        telemetry.log_forward(fwd, "kv-sharded")
        out = fwd.out.to(q.dtype)
        fwd.out = None
        ctx.save_for_backward(q, k, v)
        ctx.fwd, ctx.spec, ctx.softmax_scale, ctx.vis, ctx.group = fwd, spec, softmax_scale, vis, group
        ctx.alpha_like = None if alpha_tensor is None else alpha_tensor.new_empty(alpha_tensor.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        alpha_grad = ctx.alpha_like is not None and ctx.needs_input_grad[4]
        dq, dk, dv, d_alpha_rows = entmax_backward(backend_for(q), q, grad_out.contiguous(), SingleBlock(k, v, ctx.vis),
                                                   ctx.fwd, ctx.spec, ctx.softmax_scale, AllReduceMerge(ctx.group),
                                                   alpha_grad=alpha_grad)
        d_alpha = alpha_gradient_in_shape(d_alpha_rows.sum(dim=(0, 2)), ctx.alpha_like) if alpha_grad else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, d_alpha, None, None, None


@torch.compiler.disable  # collectives run eagerly; compiled callers graph-break here
def kv_sharded_adasplash_func(q, k_local, v_local, alpha: float = 1.5, causal: bool = True,
                              softmax_scale: float | None = None, group=None, window_size: tuple[int, int] = (-1, -1),
                              sink_tokens: int = 0):
    """Entmax attention of replicated queries against keys/values sharded over ``group``.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim), identical on every rank.
        k_local, v_local: (batch, seqlen_k_local, heads_kv, head_dim): rank r holds keys
            ``[r * Sk_local, (r + 1) * Sk_local)`` of the global key sequence (Sk = P * Sk_local).
        causal: bottom-right aligned over the global keys: query i sees keys ``j <= i + Sk - Sq``.
        window_size, sink_tokens: as in :func:`ring_adasplash.adasplash_func`, over the global keys.
    Returns:
        (batch, seqlen_q, heads_q, head_dim), identical on every rank. The gradient of q is the
        full gradient (summed over ranks); k_local and v_local get their own shard's gradients.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def local_checks():
        heads, _, dim = check_qkv(q, k_local, v_local, backend=backend_for(q))
        checked_alpha = check_head_alpha(alpha, heads)
        scale = default_scale(softmax_scale, dim)
        window = check_window(window_size, sink_tokens)
        return options_description(q, k_local, checked_alpha, causal, scale, *window), (checked_alpha, scale, window)

    alpha, scale, (window, sinks) = checked_on_groups(local_checks, [group])
    seqlen_q, local_k = q.shape[1], k_local.shape[1]
    q_pos = torch.arange(seqlen_q, device=q.device)
    k_pos = torch.arange(rank * local_k, (rank + 1) * local_k, device=q.device)
    diagonal = world * local_k - seqlen_q
    vis = windowed(positional_visibility(q_pos, k_pos, causal, diagonal=diagonal), q_pos + diagonal, window, sinks)
    return KVShardedAttention.apply(q, k_local, v_local, alpha, alpha.tensor, scale, vis, group)
