"""Single-device alpha-entmax attention: custom ops (with fake impls for torch.compile), autograd,
and the public functions.

    out = adasplash_func(q, k, v, alpha=1.5, causal=True)

Semantics: ``p = entmax_alpha(softmax_scale * q k^T)`` over the visible keys, with
``entmax_alpha(s)_j = [(alpha - 1) s_j - tau]_+ ** (1 / (alpha - 1))`` and ``sum_j p_j = 1``;
``out = p v``. A query with no visible key gets a zero row and zero gradients.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import cuda_graphs, telemetry
from .checks import (HeadAlpha, check_alpha, check_cu_seqlens, check_head_alpha, check_key_padding_mask,
                     check_position_ids, check_qkv, check_window, default_scale)
from .kernels import backend_for
from .kernels.backend import CANDIDATES_ENV, AlphaSplit
from .kernels.block_mask import BlockMask, packed_width
from .kernels.algorithm import (SCHEDULE_ENV, ForwardResult, SingleBlock, default_schedule, entmax_backward,
                                entmax_forward, entmax_forward_in_query_chunks)
from .kernels.compile_ahead import compile_ahead
from .kernels.entmax_spec import alpha_gradient_in_shape, call_spec, graph_key, head_constants
from .kernels.identity import remembered_in, tensor_identity
from .kernels.visibility import (Visibility, causal_visibility, packed_visibility, padded_visibility,
                                 varlen_visibility)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ring_adasplash::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, q_limit: Tensor, q_doc: Tensor, k_pos: Tensor, k_doc: Tensor,
                      q_first: Tensor, k_win_pos: Tensor, alpha_table: Tensor, alphas: list[float],
                      softmax_scale: float, backward_sums: bool = True, pairs: int = -1, alpha_sums: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out in q's dtype, out_u, u_sum, tau, shift, support, nonzero tiles as bits:
    ``block_mask.pack_tiles``, out_c, c_sum, alpha_open: what the autograd keeps for the
    backward); see ``kernels/algorithm.py`` (``ForwardResult``); out_u in q's dtype where
    ``_stored_final`` says so, else in the compute dtype. ``alphas``: one alpha, or one per query
    head; ``alpha_table``: the same on q's device, float64, where the heads' alphas differ
    (``_alpha_table``), else empty. ``backward_sums`` False (no backward to come):
    out_u and u_sum are empty, (0,), and not computed. ``pairs``: (query, key) pairs per head
    that the visibility can reach, where the caller knows it (packed documents: the sum of their
    products), else -1: Sq x Sk per batch entry; it decides whether the call runs as a CUDA
    graph (``cuda_graphs``). ``alpha_sums`` (a backward that wants dL/dalpha): out_c (B, Sq, Hq,
    D), c_sum (B, Hq, Sq) and alpha_open (B, Hq, nQ) int8 are the ``AlphaSplit`` of the forward
    (alpha_open all 1 where it computed none); else they are empty, (0,)."""
    alphas = tuple(alphas)

    def forward(q, k, v, alpha_table, *vectors_and_constants):  # the graph key's alphas stand for ``alphas``
        return _forward(q, k, v, alpha_table, *vectors_and_constants[:6], alphas, softmax_scale, backward_sums,
                        alpha_sums)

    # the table is copied into a graph on every replay; the key holds of the alphas only what the
    # graph keeps fixed (``entmax_spec.graph_key``): a learnable alpha that moves every step
    # replays one graph
    args = (q, k, v, alpha_table, q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos, graph_key(alphas), softmax_scale,
            backward_sums, alpha_sums)
    # the schedule settings decide which kernels run, so each has graphs of its own (a graph
    # captured under another would meet kernels not yet compiled, which no capture allows)
    name = (f"forward ({os.environ.get(SCHEDULE_ENV, 'auto')} schedule, "
            f"{os.environ.get(CANDIDATES_ENV, 'default')} candidates)")
    return cuda_graphs.call(name, forward, args, copied=4, work=_work(q, k, pairs))


def _alpha_table(alpha: HeadAlpha, heads: int, device) -> Tensor:
    """``attention_forward``'s ``alpha_table``: empty where every head has one alpha; else one
    alpha per query head, float64 on ``device``: from the learnable tensor on the device (no copy
    from the host, and a new one each step; a ``DeviceAlpha``'s NaN where out of range:
    ``HeadAlpha.table``), else made once per values."""
    if alpha.on_device:
        return alpha.table(heads, device)
    if not call_spec(alpha.values).per_head:
        return head_constants((), torch.float64, device)
    if alpha.tensor is not None:
        return alpha.tensor.detach().reshape(heads).to(device=device, dtype=torch.float64)
    return head_constants(alpha.values, torch.float64, device)


def _work(q: Tensor, k: Tensor, pairs: int = -1) -> int:
    """Size of the attention matrix (of the pairs the visibility can reach, where ``pairs`` >= 0
    gives them per head): what decides whether launches or GPU work bound a call."""
    if pairs >= 0:
        return q.shape[2] * pairs
    return q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]


def _kernel_key(q: Tensor, k: Tensor, alphas, backward_sums: bool) -> tuple:
    """What decides which kernels a call compiles: the heads' powers and whether their alpha
    differs per head, not their values (a learnable alpha changes every step); the schedule;
    whether a backward is to come; the candidate slots setting (with none, the Newton schedule
    launches no candidate kernel)."""
    spec = call_spec(alphas)
    return (q.device, q.dtype, q.shape[-1], q.shape[2] // k.shape[2], (spec.power, spec.closed_form, spec.per_head),
            default_schedule(True), backward_sums, os.environ.get(CANDIDATES_ENV))


# out and dq of a call whose float32 copy would take at least this many bytes are stored by their
# kernels in the input dtype; smaller ones in float32, cast after (docs/design.md, kernel choices:
# a 16-bit store slowed those kernels more than the cast costs, where memory is not what limits)
STORE_FINAL_BYTES = 1 << 28


def _stored_final(x: Tensor) -> torch.dtype | None:
    """The dtype the kernels store ``x``'s output or gradient in: ``x``'s where a float32 copy of
    it would take ``STORE_FINAL_BYTES`` or more (at a million tokens, 16 heads and D 128, 8 GiB),
    else None (float32, cast after)."""
    return x.dtype if x.numel() * 4 >= STORE_FINAL_BYTES else None


# A forward whose maps of tiles (tile gaps, masks, lists: about four bytes per tile, held at once
# until its output pass) would cover more tiles than this takes its queries in chunks of as many
# rows as keep them within it (``algorithm.entmax_forward_in_query_chunks``): at 16 heads, from
# 256K tokens on, so that the maps stay near a quarter GiB, a few percent of what q, k, v, out and
# their gradients take there; below, one chunk (the launches of several cost time where memory is
# plenty). Each chunk is still 8K or more queries against every key (16 heads, up to 2M tokens):
# work enough for the GPU.
CHUNK_TILES = 1 << 26


def _chunk_rows(q: Tensor, k: Tensor, block_m: int, block_n: int) -> int:
    """Query rows per chunk of a forward of ``q`` against ``k``: whole query tiles whose tiles
    against every key number at most ``CHUNK_TILES`` (one tile row at least)."""
    tiles_per_query_tile = q.shape[0] * q.shape[2] * -(-k.shape[1] // block_n)
    return max(1, CHUNK_TILES // tiles_per_query_tile) * block_m


def _call_forward(q, k, v, vis: Visibility, alphas, softmax_scale: float, backward_sums: bool = True,
                  alpha_sums: bool = False, alpha_table: Tensor | None = None) -> ForwardResult:
    """The forward of every head in one set of launches, in chunks of queries where the call is
    long (``CHUNK_TILES``); per-head alphas are read from ``alpha_table`` (``_alpha_table``)
    where given, and each head runs its own form in the kernels' loops (``EntmaxSpec.power``)."""
    backend = backend_for(q)
    spec = call_spec(alphas, alpha_table)
    chunk_rows = _chunk_rows(q, k, backend.BLOCK_M, backend.BLOCK_N)
    if chunk_rows < q.shape[1]:
        return entmax_forward_in_query_chunks(backend, q, k, v, vis, spec, softmax_scale, chunk_rows,
                                              backward_sums=backward_sums, out_dtype=_stored_final(q),
                                              alpha_sums=alpha_sums)
    return entmax_forward(backend, q, SingleBlock(k, v, vis), spec, softmax_scale, backward_sums=backward_sums,
                          out_dtype=_stored_final(q), alpha_sums=alpha_sums)


def _forward(q, k, v, alpha_table, q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos, alphas: tuple,
             softmax_scale: float, backward_sums: bool, alpha_sums: bool):
    vis = Visibility(q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos)
    if q.dtype != torch.float64:  # float64 runs no Triton kernel
        compile_ahead(_kernel_key(q, k, alphas, backward_sums),
                      functools.partial(_dry_run, q, k, v, vis, alphas, softmax_scale, backward_sums, alpha_table),
                      q.device)
    fwd = _call_forward(q, k, v, vis, alphas, softmax_scale, backward_sums, alpha_sums, alpha_table)
    outputs = _outputs(q, fwd, backward_sums) + _alpha_split_outputs(q, fwd, alpha_sums)
    telemetry.log_forward(fwd, "single", saved_bytes=outputs[6].numel())
    return outputs


def _outputs(q, fwd: ForwardResult, backward_sums: bool) -> tuple:
    """``attention_forward``'s first seven outputs from the forward's result."""
    # what the backward reads of the tiles, as bits; contiguous, as the fake impl promises
    # (compiled graphs check strides)
    nonzero = fwd.block_masks[0].bits.contiguous()
    acc = fwd.tau.dtype
    if backward_sums:
        out_u, u_sum = fwd.out_u.contiguous(), fwd.u_sum.contiguous()
    else:
        out_u, u_sum = q.new_empty((0,), dtype=acc), q.new_empty((0,), dtype=acc)
    return (fwd.out.to(q.dtype).contiguous(), out_u, u_sum, fwd.tau.contiguous(), fwd.shift.contiguous(),
            fwd.support.to(acc).contiguous(), nonzero)


def _alpha_split_outputs(q, fwd: ForwardResult, alpha_sums: bool) -> tuple:
    """``attention_forward``'s ``(out_c, c_sum, alpha_open)`` from the forward's result: empty
    without ``alpha_sums``; every query tile open where the forward computed none."""
    if not alpha_sums:
        return tuple(q.new_empty((0,), dtype=dtype) for dtype in (_compute_dtype(q), _compute_dtype(q), torch.int8))
    split = fwd.alpha_split
    if split is None:
        batch, seqlen_q, heads, _ = q.shape
        return (q.new_empty((batch, seqlen_q, heads, fwd.out.shape[-1]), dtype=_compute_dtype(q)),
                q.new_empty((batch, heads, seqlen_q), dtype=_compute_dtype(q)),
                q.new_ones((batch, heads, -(-seqlen_q // backend_for(q).BLOCK_M)), dtype=torch.int8))
    return split.out_c.contiguous(), split.c_sum.contiguous(), split.open.contiguous()


def _dry_run(q, k, v, vis: Visibility, alphas, softmax_scale: float, backward_sums: bool,
             alpha_table: Tensor | None = None) -> None:
    """The forward (and with ``backward_sums`` the backward) of a call, for ``compile_ahead``:
    every kernel that either launches on this configuration, through the same steps as the call
    (the backward's tiles as the bits it is handed)."""
    out, out_u, u_sum, tau, shift, _, nonzero = _outputs(
        q, _call_forward(q, k, v, vis, alphas, softmax_scale, backward_sums, alpha_table=alpha_table), backward_sums)
    if backward_sums:
        unsplit = q.new_empty((0,))
        _backward(torch.empty_like(out), q, k, v, vis, out_u, u_sum, tau, shift, nonzero, unsplit, unsplit, unsplit,
                  alphas, softmax_scale, alpha_grad=False, alpha_table=alpha_table)


@attention_forward.register_fake
def _(q, k, v, q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos, alpha_table, alphas, softmax_scale, backward_sums=True,
      pairs=-1, alpha_sums=False):
    backend = backend_for(q)
    batch, seqlen_q, heads, _ = q.shape
    acc = _compute_dtype(q)
    packed_tiles = (batch, heads, -(-seqlen_q // backend.BLOCK_M), packed_width(-(-k.shape[1] // backend.BLOCK_N)))
    out_shape = (batch, seqlen_q, heads, v.shape[-1])
    rows = (batch, heads, seqlen_q)
    out_u_shape, u_sum_shape = (out_shape, rows) if backward_sums else ((0,), (0,))
    out_u_dtype = (_stored_final(q) or acc) if backward_sums else acc
    split_shapes = (out_shape, rows, packed_tiles[:3]) if alpha_sums else ((0,), (0,), (0,))
    return (q.new_empty(out_shape), q.new_empty(out_u_shape, dtype=out_u_dtype), q.new_empty(u_sum_shape, dtype=acc),
            q.new_empty(rows, dtype=acc), q.new_empty(rows, dtype=acc), q.new_empty(rows, dtype=acc),
            q.new_empty(packed_tiles, dtype=torch.uint8), q.new_empty(split_shapes[0], dtype=acc),
            q.new_empty(split_shapes[1], dtype=acc), q.new_empty(split_shapes[2], dtype=torch.int8))


@torch.library.custom_op("ring_adasplash::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_limit: Tensor, q_doc: Tensor,
                       k_pos: Tensor, k_doc: Tensor, q_first: Tensor, k_win_pos: Tensor, out_u: Tensor, u_sum: Tensor,
                       tau: Tensor, shift: Tensor, nonzero: Tensor, out_c: Tensor, c_sum: Tensor, alpha_open: Tensor,
                       alpha_table: Tensor, alphas: list[float], softmax_scale: float, alpha_grad: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv and, with ``alpha_grad``, dL/dalpha per query head (Hq,) in the compute
    dtype (else an empty tensor). ``out_c``, ``c_sum``, ``alpha_open``: ``attention_forward``'s
    (empty: the alpha sums term by term); ``alpha_table``: as ``attention_forward``'s."""
    # no CUDA graph here: the backward launches a few large kernels, which hide their launches,
    # and copying its eight inputs into a graph cost more than it saved (cuda_graphs.py)
    return _backward(grad_out, q, k, v, Visibility(q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos), out_u, u_sum,
                     tau, shift, nonzero, out_c, c_sum, alpha_open, alphas, softmax_scale, alpha_grad, alpha_table)


def _backward(grad_out, q, k, v, vis: Visibility, out_u, u_sum, tau, shift, nonzero, out_c, c_sum, alpha_open, alphas,
              softmax_scale: float, alpha_grad: bool, alpha_table: Tensor | None = None) -> tuple:
    backend = backend_for(q)
    # the tiles stay bits: the tile lists are built from them (a bool copy: 16 GiB at 2M tokens)
    mask = BlockMask.from_bits(nonzero, -(-k.shape[1] // backend.BLOCK_N), backend.BLOCK_M, backend.BLOCK_N,
                               q.shape[1], k.shape[1])
    split = AlphaSplit(out_c, c_sum, alpha_open) if alpha_open.numel() else None
    fwd = ForwardResult(out=None, out_u=out_u, u_sum=u_sum, tau=tau, shift=shift, support=None, block_masks=[mask],
                        alpha_split=split)
    dq, dk, dv, d_alpha_rows = entmax_backward(backend, q, grad_out, SingleBlock(k, v, vis), fwd,
                                               call_spec(alphas, alpha_table), softmax_scale, kv_grad_dtype=k.dtype,
                                               alpha_grad=alpha_grad, q_grad_dtype=_stored_final(q))
    d_alpha = d_alpha_rows.sum(dim=(0, 2)) if alpha_grad else tau.new_empty(0)
    return dq.to(q.dtype).contiguous(), dk.contiguous(), dv.contiguous(), d_alpha


@attention_backward.register_fake
def _(grad_out, q, k, v, q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos, out_u, u_sum, tau, shift, nonzero, out_c,
      c_sum, alpha_open, alpha_table, alphas, softmax_scale, alpha_grad):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            tau.new_empty(q.shape[2] if alpha_grad else 0))


class _EntmaxAttention(torch.autograd.Function):
    """Autograd over the two custom ops, as flash-attn does: torch.compile sees the ops (and their
    fake impls) inside, and eager calls skip the Python layer that ``register_autograd`` adds
    around an op (docs/design.md: host time per step). ``alpha_tensor``: the learnable alpha
    (one value or one per query head) whose gradient is wanted, else None."""

    @staticmethod
    def forward(ctx, q, k, v, q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos, alpha_tensor, alpha_table,
                alphas: tuple, softmax_scale: float, pairs: int):
        vectors = (q_limit, q_doc, k_pos, k_doc, q_first, k_win_pos)
        # the forward's part of the alpha gradient, where a backward will want it
        alpha_sums = alpha_tensor is not None and ctx.needs_input_grad[9]
        out, out_u, u_sum, tau, shift, support, nonzero, *split = attention_forward(
            q, k, v, *vectors, alpha_table, list(alphas), softmax_scale, True, pairs, alpha_sums)
        ctx.save_for_backward(q, k, v, *vectors, out_u, u_sum, tau, shift, nonzero, *split, alpha_table)
        ctx.alphas, ctx.softmax_scale = alphas, softmax_scale
        # the alpha tensor's shape and dtype, for its gradient (not the tensor: nothing to keep alive)
        ctx.alpha_like = None if alpha_tensor is None else alpha_tensor.new_empty(alpha_tensor.shape)
        ctx.mark_non_differentiable(tau, shift, support)
        return out, tau, shift, support

    @staticmethod
    def backward(ctx, grad_out, *_):
        alpha_grad = ctx.alpha_like is not None and ctx.needs_input_grad[9]
        dq, dk, dv, d_alpha = attention_backward(grad_out.contiguous(), *ctx.saved_tensors, list(ctx.alphas),
                                                 ctx.softmax_scale, alpha_grad)
        d_alpha = alpha_gradient_in_shape(d_alpha, ctx.alpha_like) if alpha_grad else None
        return dq, dk, dv, None, None, None, None, None, None, d_alpha, None, None, None, None


class AttentionStats(NamedTuple):
    """Per-row statistics of a call (``return_stats=True``), each (batch, heads_q, seqlen_q)
    (varlen: (heads_q, total_q)), float32 (float64 for float64 inputs), not differentiable.

    ``score_max``: the row's largest raw score ``q . k`` over its visible keys (0 for none).
    ``tau``: the threshold relative to it, in [-1, 0]: ``p_j = [(alpha - 1) softmax_scale
    (q . k_j - score_max) - tau]_+ ** (1 / (alpha - 1))``; +inf for a row with no visible key,
    NaN for a row that sees a score that is not finite. The absolute threshold of
    ``(alpha - 1) softmax_scale q . k`` is ``tau + (alpha - 1) softmax_scale score_max``.
    ``support``: how many keys have ``p > 0``.
    """

    tau: Tensor
    score_max: Tensor
    support: Tensor


def _attention(q, k, v, vis: Visibility, alpha: HeadAlpha, softmax_scale: float,
               pairs: int = -1) -> tuple[Tensor, AttentionStats]:
    """``pairs``: see ``attention_forward``."""
    learnable = alpha.tensor is not None and alpha.tensor.requires_grad
    table = _alpha_table(alpha, q.shape[2], q.device)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or learnable)):
        # no backward to come: the forward alone, without the row terms only the backward reads
        out, _, _, tau, shift, support, *_ = attention_forward(q, k, v, *vis.vectors(), table, list(alpha.values),
                                                              softmax_scale, False, pairs)
        return out, AttentionStats(tau, shift, support)
    out, tau, shift, support = _EntmaxAttention.apply(q, k, v, *vis.vectors(), alpha.tensor, table, alpha.values,
                                                      softmax_scale, pairs)
    return out, AttentionStats(tau, shift, support)


@functools.lru_cache(maxsize=16)
def _causal_visibility(seqlen_q: int, seqlen_k: int, causal: bool, device: torch.device, window_size: tuple,
                       sink_tokens: int) -> Visibility:
    """``causal_visibility``, built once per shape: a training step calls attention with the same
    shapes every layer, and the kernels remember what they derive from the vectors' identity."""
    return causal_visibility(seqlen_q, seqlen_k, causal, device, window_size, sink_tokens)


def _empty_stats(q: Tensor, shape: tuple) -> AttentionStats:
    """``AttentionStats`` of a call with nothing to attend."""
    empty = q.new_zeros(shape, dtype=_compute_dtype(q))
    return AttentionStats(empty.clone(), empty.clone(), empty)


def empty_output(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The output of a call with nothing to attend (no batch entry, no head, no valid token), as
    SDPA gives it: zeros of q's shape with v's head dim, differentiable (zero gradients)."""
    connect = q.sum() + k.sum() + v.sum()  # zero, with a gradient path to every input
    return connect.to(q.dtype) * q.new_zeros((*q.shape[:-1], v.shape[-1]))


def adasplash_func(q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor = 1.5, causal: bool = True,
                   softmax_scale: float | None = None, key_padding_mask: Tensor | None = None,
                   window_size: tuple[int, int] = (-1, -1), sink_tokens: int = 0,
                   position_ids: Tensor | None = None, return_stats: bool = False):
    """Exact alpha-entmax attention on one device.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim).
        k, v: (batch, seqlen_k, heads_kv, head_dim); ``heads_q % heads_kv == 0`` (GQA/MQA: each
            key/value head serves ``heads_q // heads_kv`` query heads, without copies).
        alpha: in (1, 2]; 1.5 (entmax-1.5) and 2 (sparsemax) have closed-form fast paths. A
            float, a one-element tensor or a tensor of shape (heads_q,), one alpha per query head
            (the heads of a GQA group may differ); a tensor with ``requires_grad`` gets its exact
            gradient (learnable alpha, as in adaptively sparse transformers), summed over the
            batch and the rows. Every head runs in the same launches, the kernels reading each
            head's alpha (a head of 1.5 or 2 keeps its closed form's powers); a per-head tensor
            with one value costs what a float costs.
        causal: bottom-right aligned, as in flash-attn: query ``i`` sees keys ``j <= i + Sk - Sq``.
        softmax_scale: multiplies ``q k^T``; default ``1 / sqrt(head_dim)``.
        key_padding_mask: optional (batch, seqlen_k) bool, True for the keys to keep (left or right
            padding, any pattern). Positions keep their place (causal alignment counts the padding),
            key tiles made only of padding are never read, and a query that sees no kept key gets
            a zero row.
        window_size: (left, right), as flash-attn: query ``i`` sees keys ``j`` with
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (-1: unbounded), with causal too.
            Key tiles outside every window are never read.
        sink_tokens: the first ``sink_tokens`` keys (of each batch entry; the first kept ones with
            padding) stay visible to every query past its window's start (StreamingLLM's
            attention sinks); causal still applies.
        position_ids: optional (batch, seqlen) int for self-attention (``Sq == Sk``, no padding
            mask): documents packed into each row, a new one wherever the positions restart at 0
            (as transformers marks packed sequences); a token sees only its own document. Sinks
            are then the first tokens of each document.
        return_stats: also return the rows' ``AttentionStats`` (tau, score max, support size),
            as flash-attn returns the log-sum-exp.
    Returns:
        (batch, seqlen_q, heads_q, head_dim) in q's dtype, and with ``return_stats`` an
        ``AttentionStats`` of (batch, heads_q, seqlen_q) tensors. Differentiable in q, k and v;
        partial sums in float32. CUDA tensors run the Triton kernels, CPU tensors the PyTorch path.
    """
    heads, _, dim = check_qkv(q, k, v, backend=backend_for(q))
    alpha = check_head_alpha(alpha, heads)
    window_size, sink_tokens = check_window(window_size, sink_tokens)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[1], q.device)
    if position_ids is not None:
        check_position_ids(position_ids, q.shape[0], q.shape[1], k.shape[1], key_padding_mask is not None, q.device)
    if q.shape[0] == 0 or q.shape[2] == 0:
        out = empty_output(q, k, v)
        return (out, _empty_stats(q, (q.shape[0], q.shape[2], q.shape[1]))) if return_stats else out
    scale = default_scale(softmax_scale, dim)
    if key_padding_mask is None and position_ids is None:
        vis = _causal_visibility(q.shape[1], k.shape[1], causal, q.device, window_size, sink_tokens)
        out, stats = _attention(q, k, v, vis, alpha, scale)
        return (out, stats) if return_stats else out
    # the batch entries side by side as one sequence of documents (padding belongs to none)
    batch, seqlen_q, heads = q.shape[:3]
    if position_ids is not None:
        vis = packed_visibility(position_ids, causal, window_size, sink_tokens)
    else:
        vis = padded_visibility(key_padding_mask, seqlen_q, causal, window_size, sink_tokens)
    flat = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v)]
    out, stats = _attention(*flat, vis, alpha, scale)
    out = out.view(batch, seqlen_q, heads, v.shape[-1])
    if not return_stats:
        return out
    return out, AttentionStats(*(t.view(heads, batch, seqlen_q).transpose(0, 1) for t in stats))


def adasplash_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, alpha: float | Tensor = 1.5, causal: bool = True,
                          softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                          sink_tokens: int = 0, return_stats: bool = False):
    """Entmax attention over packed sequences, as flash-attn's varlen interface.

    Args:
        q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim).
        cu_seqlens_q, cu_seqlens_k: (num_seqs + 1,) int32/int64 offsets, from 0 to total.
        max_seqlen_q, max_seqlen_k: longest sequence (checked; kernels do not need them).
        alpha: as in :func:`adasplash_func` (one float, or one per query head, learnable).
        causal: bottom-right aligned within each sequence.
        window_size, sink_tokens: as in :func:`adasplash_func`, within each sequence.
        return_stats: also return ``AttentionStats`` of (heads_q, total_q) tensors.
    Returns: (total_q, heads_q, head_dim) (and the stats).
    """
    window_size, sink_tokens = check_window(window_size, sink_tokens)
    heads, _, dim = check_qkv(q, k, v, varlen=True, backend=backend_for(q))
    alpha = check_head_alpha(alpha, heads)
    packing = _packing(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], causal, window_size, sink_tokens, q.device)
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, packing.longest_q),
                                 ("max_seqlen_k", max_seqlen_k, packing.longest_k)):
        if int(given) < longest:
            raise ValueError(f"{name} ({given}) is smaller than the longest sequence ({longest})")
    if q.shape[1] == 0:
        out = empty_output(q, k, v)
        return (out, _empty_stats(q, (0, q.shape[0]))) if return_stats else out
    out, stats = _attention(q[None], k[None], v[None], packing.vis, alpha, default_scale(softmax_scale, dim),
                            packing.pairs)
    return (out[0], AttentionStats(*(t[0] for t in stats))) if return_stats else out[0]


class _Packing(NamedTuple):
    """A checked packing (``_packing``): its visibility, its longest sequences and the (query,
    key) pairs of its sequences, summed; ``offsets``: the ``cu_seqlens`` tensors it was made from,
    held so that their memory cannot be handed to other tensors while the entry lives."""

    vis: Visibility
    longest_q: int
    longest_k: int
    pairs: int
    offsets: tuple


_PACKINGS: dict = {}
PACKINGS_KEPT = 16


def _packing(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, causal: bool, window_size: tuple,
             sink_tokens: int, device) -> _Packing:
    """The ``cu_seqlens`` checked and their visibility built once per pair of tensors (their
    memory, layout and version: an in-place change misses): a model calls attention with the same
    offsets in every layer. Checking reads them on the host, which waits for the GPU, and the
    visibility's vectors are what the launchers and the CUDA graphs know a call by: new vectors on
    every call meant a wait, small kernels of their own and the launchers' (their tile ranges), and no
    graph (benchmarks/RESULTS.md, masks)."""
    def identity(t):
        return tensor_identity(t) if isinstance(t, Tensor) else id(t)

    key = (identity(cu_seqlens_q), identity(cu_seqlens_k), total_q, total_k, causal, window_size, sink_tokens,
           str(device))
    return remembered_in(_PACKINGS, key, PACKINGS_KEPT, lambda: _checked_packing(
        cu_seqlens_q, cu_seqlens_k, total_q, total_k, causal, window_size, sink_tokens, device))


def _checked_packing(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, causal: bool, window_size: tuple,
                     sink_tokens: int, device) -> _Packing:
    """``_packing`` on a miss: the checks (raising on bad offsets) and the visibility."""
    check_cu_seqlens(cu_seqlens_q, total_q, "cu_seqlens_q")
    check_cu_seqlens(cu_seqlens_k, total_k, "cu_seqlens_k")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must list the same number of sequences; got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    len_q, len_k = (torch.diff(cu.cpu().to(torch.int64)) for cu in (cu_seqlens_q, cu_seqlens_k))
    vis = varlen_visibility(cu_seqlens_q.to(device), cu_seqlens_k.to(device), causal, window_size, sink_tokens)
    return _Packing(vis, int(len_q.max()), int(len_k.max()), int((len_q * len_k).sum()), (cu_seqlens_q, cu_seqlens_k))


class AdaSplashAttention(torch.nn.Module):
    """``nn.Module`` form of :func:`adasplash_func`: forward(q, k, v, key_padding_mask=None) with
    (B, S, H, D) tensors."""

    def __init__(self, alpha: float = 1.5, causal: bool = True, softmax_scale: float | None = None,
                 window_size: tuple[int, int] = (-1, -1), sink_tokens: int = 0):
        super().__init__()
        self.alpha, self.causal, self.softmax_scale = check_alpha(alpha), causal, softmax_scale
        self.window_size, self.sink_tokens = check_window(window_size, sink_tokens)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return adasplash_func(q, k, v, self.alpha, self.causal, self.softmax_scale, key_padding_mask,
                              self.window_size, self.sink_tokens)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, causal={self.causal}, softmax_scale={self.softmax_scale}, "
                f"window_size={self.window_size}, sink_tokens={self.sink_tokens}")
