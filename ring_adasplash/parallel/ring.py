"""Ring context parallelism for entmax attention: contiguous and zigzag layouts, packed documents.

Each rank keeps its query shard; key (and value) shards travel around the ring, one rotation
per pass of the forward (``kernels/algorithm.py``): K for the max pass (only the tiles some
query sees: under causal or a window, a shard skips the ranks that read none of it), K for the
histogram pass, K for the fine histogram pass and twice for the exact finish (alpha 1.5 and 2;
other alpha: one per Newton step, five) and K+V for the output pass. From the max pass on, every rank knows which key tiles
of every shard a pass needs; one ``all_gather`` of those bitmaps per pass gives every rank the
same schedule, and a shard's holder sends only the tiles some rank further along still needs.
The backward rotates K+V once more, with dK/dV accumulators travelling behind them back to their
owners.

Order in this file: the ring of key blocks (forward sweep, backward sweep), the autograd
Function, the public functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .. import telemetry
from ..checks import HeadAlpha, check_cu_seqlens
from ..comm import RingComm
from ..kernels import backend_for
from ..kernels.algorithm import KeyBlock, entmax_backward, entmax_forward, visible_tiles
from ..kernels.entmax_spec import alpha_gradient_in_shape, call_spec
from ..kernels.visibility import NO_LIMIT, Visibility, window_positions, windowed
from . import layouts
from .validation import validated_self_attention


@dataclass
class ShardPlan:
    """Where this rank's queries and every shard's keys sit in the global sequence."""

    comm: RingComm
    query_vis: Visibility  # q side of this rank; k side filled per shard
    key_side: Callable[[int], tuple]  # shard index -> (k_pos, k_doc, k_win_pos), int32 on the device
    name: str

    def visibility(self, shard: int) -> Visibility:
        return self.query_vis.with_keys(*self.key_side(shard))


def _tile_rows(tiles: torch.Tensor | None, block_n: int, length: int, device) -> torch.Tensor | None:
    """Row indices covered by the selected key tiles (None: all rows)."""
    if tiles is None:
        return None
    index = tiles.nonzero().flatten().to(device)
    rows = (index[:, None] * block_n + torch.arange(block_n, device=device)).flatten()
    return rows[rows < length]


class RingKeyBlocks:
    """Key blocks of a ring: block ``s`` is the shard of rank ``s``; at step ``t`` rank ``r`` holds
    shard ``(r - t) mod P``. Implements ``algorithm.KeyBlocks``: the ring's send and receive are
    ``_pass_to_next``, posted by ``sweep`` before it yields a block."""

    reads_needed = True  # only the key tiles some rank needs travel

    def __init__(self, k: torch.Tensor, v: torch.Tensor, plan: ShardPlan, block_n: int):
        self.k, self.v, self.plan, self.block_n = k, v, plan, block_n
        self.comm = plan.comm
        self.num_blocks = self.comm.world_size
        self._needs_cache: tuple = (None, None)  # the last pass's masks and their gathered table

    # -- schedule --------------------------------------------------------------------------
    def _all_needs(self, needed: list | None) -> torch.Tensor | None:
        """(P ranks, P shards, nK) bool on CPU: which key tiles each rank needs from each shard
        (``needed``: this rank's ``BlockMask`` per shard); None when every tile travels."""
        if needed is None:
            return None
        if self._needs_cache[0] is needed:
            return self._needs_cache[1]
        mine = torch.stack([mask.needed_key_tiles() for mask in needed]).to(torch.uint8)
        gathered = [torch.empty_like(mine) for _ in range(self.num_blocks)]
        dist.all_gather(gathered, mine, group=self.comm.group)
        table = torch.stack(gathered).bool().cpu()
        self._needs_cache = (needed, table)
        return table

    def _sent_tiles(self, table, shard: int, step: int, first_reader: int | None = None):
        """Tiles of ``shard`` its holder sends at ``step``: those some later rank still needs."""
        if table is None:
            return None
        p = self.num_blocks
        start = step + 1 if first_reader is None else first_reader
        readers = [(shard + i) % p for i in range(start, p)]
        return table[readers, shard].any(0)

    def _pass_to_next(self, held: torch.Tensor, table, shard: int, step: int, pass_name: str,
                      first_reader: int | None = None):
        """Start sending the tiles of ``held`` (shard ``shard``) that later ranks need to the next
        rank, and receiving shard ``shard - 1``'s from the previous; returns a function that
        waits and gives the received block (tiles nobody needs as zeros)."""
        send_tiles = self._sent_tiles(table, shard, step, first_reader)
        recv_tiles = self._sent_tiles(table, (shard - 1) % self.num_blocks, step, first_reader)
        length = held.shape[1]
        rows_out = _tile_rows(send_tiles, self.block_n, length, held.device)
        rows_in = _tile_rows(recv_tiles, self.block_n, length, held.device)
        packed = held if rows_out is None else held.index_select(1, rows_out)
        shape = list(held.shape)
        if rows_in is not None:
            shape[1] = rows_in.numel()
        pending = self.comm.exchange(packed, shape, held.numel() * held.element_size(), pass_name)

        def finish():
            received = pending.wait()
            if rows_in is None:
                return received
            return torch.zeros_like(held).index_copy_(1, rows_in, received)

        return finish

    # -- forward sweep ---------------------------------------------------------------------
    def sweep(self, with_values: bool, needed: list | None = None, pass_name: str = "") -> Iterator[KeyBlock]:
        """Every shard in ring order; the next one's transfer is posted before this one is yielded."""
        p, r = self.num_blocks, self.comm.rank
        table = self._all_needs(needed)
        held = torch.cat([self.k, self.v], -1) if with_values else self.k
        dim = self.k.shape[-1]
        for step in range(p):
            shard = (r - step) % p
            finish = self._pass_to_next(held, table, shard, step, pass_name) if step < p - 1 else None
            k, v = (held[..., :dim], held[..., dim:]) if with_values else (held, None)
            yield KeyBlock(shard, k, v, self.plan.visibility(shard))
            if finish is not None:
                held = finish()

    def backward_sweep(self, needed: list) -> "RingGradients":
        return RingGradients(self, self._all_needs(needed))

    def visible(self, block_m: int, block_n: int) -> list:
        return [visible_tiles(self.plan.visibility(shard), block_m, block_n) for shard in range(self.num_blocks)]


class RingGradients:
    """The backward's sweep: K+V travel as in the forward; the dK/dV of each shard travel behind
    them, gathering every rank's contribution, and reach their owner after a full turn."""

    def __init__(self, blocks: RingKeyBlocks, table):
        self.blocks, self.table = blocks, table
        self.own = self.accumulated = None  # this rank's own shard's grads; the travelling ones
        self.step = 0

    def __iter__(self) -> Iterator[KeyBlock]:
        blocks = self.blocks
        p, r, dim = blocks.num_blocks, blocks.comm.rank, blocks.k.shape[-1]
        held = torch.cat([blocks.k, blocks.v], -1)
        for self.step in range(p):
            shard = (r - self.step) % p
            finish = blocks._pass_to_next(held, self.table, shard, self.step, "backward") if self.step < p - 1 else None
            yield KeyBlock(shard, held[..., :dim], held[..., dim:], blocks.plan.visibility(shard))
            if finish is not None:
                held = finish()

    def hand_back(self, dk: torch.Tensor, dv: torch.Tensor) -> None:
        grads = torch.cat([dk, dv], -1)
        if self.step == 0:
            self.own = grads
            return
        grads = grads if self.accumulated is None else self.accumulated() + grads
        # dK/dV of this shard go on towards its owner, carrying every tile any rank touched
        shard = (self.blocks.comm.rank - self.step) % self.blocks.num_blocks
        self.accumulated = self.blocks._pass_to_next(grads, self.table, shard, 0, "backward-grads", first_reader=1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        own = self.own if self.accumulated is None else self.own + self.accumulated()
        dim = self.blocks.k.shape[-1]
        return own[..., :dim], own[..., dim:]


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------


class RingAttention(torch.autograd.Function):
    """Entmax attention of local query shards against the key/value shards of every rank."""

    @staticmethod
    def forward(ctx, q, k, v, alpha: HeadAlpha, alpha_tensor, softmax_scale: float, plan: ShardPlan):
        """``alpha_tensor``: ``alpha.tensor``, an input of its own so that autograd gives it a
        gradient."""
        backend = backend_for(q)
        spec = call_spec(alpha.values, alpha.table(q.shape[2], q.device))  # a DeviceAlpha's table, else None
        fwd = entmax_forward(backend, q, RingKeyBlocks(k, v, plan, backend.BLOCK_N), spec, softmax_scale)
        telemetry.log_forward(fwd, plan.name, local_block=plan.comm.rank)
        out = fwd.out.to(q.dtype)
        fwd.out = None  # the backward needs only the row terms
        ctx.save_for_backward(q, k, v)
        ctx.fwd, ctx.spec, ctx.softmax_scale, ctx.plan = fwd, spec, softmax_scale, plan
        ctx.alpha_like = None if alpha_tensor is None else alpha_tensor.new_empty(alpha_tensor.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        backend = backend_for(q)
        alpha_grad = ctx.alpha_like is not None and ctx.needs_input_grad[4]
        blocks = RingKeyBlocks(k, v, ctx.plan, backend.BLOCK_N)
        dq, dk, dv, d_alpha_rows = entmax_backward(backend, q, grad_out.contiguous(), blocks, ctx.fwd, ctx.spec,
                                                   ctx.softmax_scale, alpha_grad=alpha_grad)
        d_alpha = alpha_gradient_in_shape(d_alpha_rows.sum(dim=(0, 2)), ctx.alpha_like) if alpha_grad else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, d_alpha, None, None


# ------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------


def _validated(q, k, v, alpha, softmax_scale, group, layout: str, causal: bool, varlen: bool = False, extra=None,
               window_size=(-1, -1), sink_tokens=0):
    """Local checks, then one collective so that bad or mismatched input raises on every rank.
    Returns the ring's ``RingComm`` and the ``CheckedOptions``."""
    comm = RingComm(group)

    def layout_checks():
        seqlen_local = q.shape[0 if varlen else 1]
        layouts.positions(layout, seqlen_local * comm.world_size, comm.rank, comm.world_size)
        return {"layout": layout, **(extra or {})}, None

    return comm, validated_self_attention(q, k, v, alpha, softmax_scale, causal, [group], layout_checks, varlen,
                                          window_size, sink_tokens)


def _positional_plan(comm: RingComm, layout: str, seqlen: int, causal: bool, device, doc_of=None, name="ring",
                     window_size=(-1, -1), sink_tokens: int = 0, doc_start=None):
    """Global positions of every shard; ``doc_of`` (global position -> document) and ``doc_start``
    (document -> its first position) for packed documents; the window and sinks over global
    positions (sinks: the first keys of each document)."""
    p, r = comm.world_size, comm.rank

    def key_side(shard):
        pos = layouts.positions(layout, seqlen, shard, p, device)
        doc = doc_of[pos] if doc_of is not None else torch.zeros_like(pos)
        in_doc = pos - doc_start[doc] if doc_start is not None else pos
        return pos.to(torch.int32), doc.to(torch.int32), window_positions(pos, in_doc, sink_tokens)

    q_pos, q_doc, _ = key_side(r)
    q_limit = q_pos if causal else torch.full_like(q_pos, NO_LIMIT)
    query_vis = windowed(Visibility(q_limit, q_doc, q_pos, q_doc), q_pos, window_size, 0)
    return ShardPlan(comm, query_vis, key_side, name)


def _ring(q, k, v, alpha, causal, softmax_scale, group, layout, window_size, sink_tokens):
    comm, checked = _validated(q, k, v, alpha, softmax_scale, group, layout, causal, window_size=window_size,
                               sink_tokens=sink_tokens)
    plan = _positional_plan(comm, layout, q.shape[1] * comm.world_size, causal, q.device, name=f"ring-{layout}",
                            window_size=checked.window_size, sink_tokens=checked.sink_tokens)
    return RingAttention.apply(q, k, v, checked.alpha, checked.alpha.tensor, checked.softmax_scale, plan)


@torch.compiler.disable  # exchanges run eagerly; compiled callers graph-break here
def ring_adasplash_func(q, k, v, alpha: float = 1.5, causal: bool = True, softmax_scale: float | None = None,
                        group=None, window_size: tuple[int, int] = (-1, -1), sink_tokens: int = 0):
    """Entmax attention over a sequence sharded contiguously across ``group`` (default: world).

    Args:
        q: (batch, seqlen_local, heads_q, head_dim): rank r holds tokens ``[r*S/P, (r+1)*S/P)``.
        k, v: (batch, seqlen_local, heads_kv, head_dim), the same tokens; ``heads_q % heads_kv == 0``.
        alpha, causal, softmax_scale, window_size, sink_tokens: as in
            :func:`ring_adasplash.adasplash_func` (over global positions; all ranks must pass the
            same values).
    Returns:
        (batch, seqlen_local, heads_q, head_dim): this rank's rows of the full-sequence result.
    """
    return _ring(q, k, v, alpha, causal, softmax_scale, group, "contiguous", window_size, sink_tokens)


@torch.compiler.disable  # exchanges run eagerly; compiled callers graph-break here
def zigzag_ring_adasplash_func(q, k, v, alpha: float = 1.5, causal: bool = True, softmax_scale: float | None = None,
                               group=None, window_size: tuple[int, int] = (-1, -1), sink_tokens: int = 0):
    """As :func:`ring_adasplash_func`, with the zigzag layout: the sequence is cut into 2P chunks
    and rank r holds chunk r followed by chunk 2P - 1 - r (``parallel.layouts.shard``), which
    balances causal work. Shapes: (batch, seqlen_local, heads, head_dim)."""
    return _ring(q, k, v, alpha, causal, softmax_scale, group, "zigzag", window_size, sink_tokens)


@torch.compiler.disable  # exchanges run eagerly; compiled callers graph-break here
def ring_adasplash_varlen_func(q, k, v, cu_seqlens, alpha: float = 1.5, causal: bool = True,
                               softmax_scale: float | None = None, group=None, window_size: tuple[int, int] = (-1, -1),
                               sink_tokens: int = 0):
    """Packed documents spread contiguously across the ring.

    Args:
        q: (total_local, heads_q, head_dim); k, v: (total_local, heads_kv, head_dim): rank r holds
            packed tokens ``[r*T/P, (r+1)*T/P)`` of the global packed sequence of length T.
        cu_seqlens: (num_docs + 1,) GLOBAL offsets of the documents, from 0 to T, same on all ranks.
    A token attends only to tokens of its own document (causally when ``causal``; within
    ``window_size`` and to the first ``sink_tokens`` of its document, as in ``adasplash_func``).
    Returns: (total_local, heads_q, head_dim).
    """
    comm, checked = _validated(q, k, v, alpha, softmax_scale, group, "contiguous", causal, varlen=True,
                               extra={"cu_seqlens": tuple(int(x) for x in cu_seqlens.tolist())},
                               window_size=window_size, sink_tokens=sink_tokens)
    total = q.shape[0] * comm.world_size
    check_cu_seqlens(cu_seqlens, total, "cu_seqlens")
    cu = cu_seqlens.to(q.device, torch.int64)
    doc_of = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), cu[1:] - cu[:-1],
                                     output_size=total)
    plan = _positional_plan(comm, "contiguous", total, causal, q.device, doc_of=doc_of, name="ring-varlen",
                            window_size=checked.window_size, sink_tokens=checked.sink_tokens, doc_start=cu[:-1])
    return RingAttention.apply(q[None], k[None], v[None], checked.alpha, checked.alpha.tensor, checked.softmax_scale,
                               plan)[0]
