"""All-gather K/V, then the one-device kernels (llama3 style); reduce-scatter dK/dV in backward.

Simple and fast for moderate lengths: every rank holds the whole K/V of one head group at a time,
so memory per rank is O(S * heads_per_step * head_dim); choose ``heads_per_step`` to bound it.

Order: the autograd Function, the public function.
"""
from __future__ import annotations

import torch

from .. import telemetry
from ..comm.collectives import all_gather_seq, reduce_scatter_seq
from ..checks import HeadAlpha
from ..kernels import backend_for
from ..kernels.entmax_spec import alpha_gradient_in_shape, call_spec
from ..kernels.algorithm import SingleBlock, entmax_backward, entmax_forward
from ..kernels.visibility import NO_LIMIT, Visibility, windowed
from . import layouts
from .ring import _validated


class AllGatherAttention(torch.autograd.Function):
    """Per chunk of key/value heads: gather them, then one device's schedule for the chunk's query
    heads."""

    @staticmethod
    def forward(ctx, q, k, v, alpha: HeadAlpha, alpha_tensor, softmax_scale: float, vis, head_chunks, group):
        backend = backend_for(q)
        per_kv = q.shape[2] // k.shape[2]
        outs, results = [], []
        for start, stop in head_chunks:
            k_all, v_all = (all_gather_seq(x[:, :, start:stop], group) for x in (k, v))
            q_chunk = q[:, :, start * per_kv:stop * per_kv]
            chunk_alpha = alpha.for_heads(start * per_kv, stop * per_kv)
            # a DeviceAlpha's table, else None
            spec = call_spec(chunk_alpha.values, chunk_alpha.table(q_chunk.shape[2], q.device))
            fwd = entmax_forward(backend, q_chunk, SingleBlock(k_all, v_all, vis), spec, softmax_scale)
            telemetry.log_forward(fwd, "allgather")
            outs.append(fwd.out.to(q.dtype))
            fwd.out = None
            results.append((spec, fwd))
        ctx.save_for_backward(q, k, v)
        ctx.meta = (softmax_scale, vis, head_chunks, group, results)
        ctx.alpha_like = None if alpha_tensor is None else alpha_tensor.new_empty(alpha_tensor.shape)
        return torch.cat(outs, 2)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        softmax_scale, vis, head_chunks, group, results = ctx.meta
        alpha_grad = ctx.alpha_like is not None and ctx.needs_input_grad[4]
        backend, per_kv = backend_for(q), q.shape[2] // k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_alpha = []
        for (start, stop), (spec, fwd) in zip(head_chunks, results):
            qs = slice(start * per_kv, stop * per_kv)
            k_all, v_all = (all_gather_seq(x[:, :, start:stop], group) for x in (k, v))
            q_chunk, do_chunk = q[:, :, qs], grad_out[:, :, qs].contiguous()
            dq_h, dk_all, dv_all, d_alpha_rows = entmax_backward(backend, q_chunk, do_chunk,
                                                                 SingleBlock(k_all, v_all, vis), fwd, spec,
                                                                 softmax_scale, alpha_grad=alpha_grad)
            dq[:, :, qs] = dq_h
            dk[:, :, start:stop] = reduce_scatter_seq(dk_all, group)
            dv[:, :, start:stop] = reduce_scatter_seq(dv_all, group)
            if alpha_grad:
                d_alpha.append(d_alpha_rows.sum(dim=(0, 2)))
        d_alpha = alpha_gradient_in_shape(torch.cat(d_alpha), ctx.alpha_like) if alpha_grad else None
        return dq, dk, dv, None, d_alpha, None, None, None, None


@torch.compiler.disable  # collectives run eagerly; compiled callers graph-break here
def allgather_adasplash_func(q, k, v, alpha: float = 1.5, causal: bool = True, softmax_scale: float | None = None,
                             group=None, layout: str = "contiguous", heads_per_step: int | None = None,
                             window_size: tuple[int, int] = (-1, -1), sink_tokens: int = 0):
    """Entmax attention of sequence shards by all-gathering K/V (a head group at a time).

    Args:
        q: (batch, seqlen_local, heads_q, head_dim); k, v: (batch, seqlen_local, heads_kv, head_dim),
            sharded with ``layout`` ("contiguous" or "zigzag", see ``parallel.layouts``).
        heads_per_step: key/value heads gathered at once (default: all); lower it to bound memory.
        window_size, sink_tokens: as in :func:`ring_adasplash.adasplash_func`, over global positions.
    Returns: (batch, seqlen_local, heads_q, head_dim), this rank's rows.
    """
    comm, checked = _validated(q, k, v, alpha, softmax_scale, group, layout, causal,
                               extra={"heads_per_step": heads_per_step}, window_size=window_size,
                               sink_tokens=sink_tokens)
    world, seqlen = comm.world_size, q.shape[1] * comm.world_size
    heads_kv = k.shape[2]
    step = heads_kv if heads_per_step is None else int(heads_per_step)
    if not 1 <= step <= heads_kv:
        raise ValueError(f"heads_per_step must be in [1, {heads_kv}] (the key/value heads); got {heads_per_step}")
    chunks = [(h, min(h + step, heads_kv)) for h in range(0, heads_kv, step)]
    k_pos = torch.cat([layouts.positions(layout, seqlen, r, world, q.device) for r in range(world)]).to(torch.int32)
    q_pos = layouts.positions(layout, seqlen, comm.rank, world, q.device).to(torch.int32)
    q_limit = q_pos if causal else torch.full_like(q_pos, NO_LIMIT)
    vis = Visibility(q_limit, torch.zeros_like(q_pos), k_pos, torch.zeros_like(k_pos))
    vis = windowed(vis, q_pos, checked.window_size, checked.sink_tokens)
    return AllGatherAttention.apply(q, k, v, checked.alpha, checked.alpha.tensor, checked.softmax_scale, vis, chunks,
                                    group)
