"""The forward and backward schedule shared by one device and every distributed strategy.

A query block meets its keys as one or more *key blocks* (the whole sequence on one device, a
shard per ring step in a ring). ``KeyBlocks`` hides how blocks arrive; this module says what is
computed on each and how the pieces combine:

    forward  1. max pass on every block (dense Q.K^T: the only dense pass): row max, tau floor
                (first block), tile gaps against max(tau floor, row max - 1), a lower bound of tau
             2. histogram pass (sparse): coarse counts against the row max over all blocks, on
                the tiles that reach the bin of that bound; counts add exactly
             3. bracket tau in two adjacent bins; block mask = tiles with a key above them
             4. refinement pass on active tiles (sparse): fine histogram of the two bins and
                exact moments above them (alpha 1.5, 2) or NEWTON_STEPS Newton passes (other
                alpha); exact tau. For alpha 1.5 and 2 the block mask is then rebuilt from the
                exact tau and tightened per row
             5. output pass on active tiles (sparse): sum p v, sum u v, sum u; exact zero tiles found
    backward one pass on nonzero tiles: dq here, dk and dv of each block handed back to the block

Total: one dense Q.K^T pass in the forward (AdaSplash-2 runs four), every other pass sparse.
Taking the histogram after the global row max is known, rather than per block against each
block's own max, keeps it sparse in a ring too: a far block's own max says nothing about tau.
No autograd and no communication here: callers bring both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from . import stats as S
from .visibility import Visibility


class KeyBlocks(Protocol):
    """How a query block meets its key blocks. ``fn(index, k, v, vis)`` runs on every block that
    ``needed`` (a list of per-block bool vectors over key tiles, or None for all) says is needed;
    ``v`` is None unless ``with_values``; ``pass_name`` labels the pass in telemetry. ``fn`` runs on
    every block, in the same order on every rank; key tiles that no rank needs may arrive as
    zeros, so ``fn`` reads only the tiles its masks name. ``reads_needed``: whether ``visit``
    uses ``needed`` at all (when not, the forward does not compute it)."""

    num_blocks: int
    reads_needed: bool

    def visit(self, fn: Callable, with_values: bool, needed=None, pass_name: str | None = None) -> None: ...

    def visit_backward(self, fn: Callable, needed) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ForwardResult:
    """Everything the backward and the telemetry need, per query row (B, Hq, Sq) unless noted."""

    out: torch.Tensor  # (B, Sq, Hq, D) float32 partial-free output
    out_u: torch.Tensor  # (B, Sq, Hq, D) float32, sum u v
    u_sum: torch.Tensor  # sum u
    tau: torch.Tensor  # float32, +inf on rows with no visible key
    support: torch.Tensor  # keys with p > 0
    nonzero: list = field(default_factory=list)  # per block: (B, Hq, nQ, nK) bool, tiles with p > 0
    active: list = field(default_factory=list)  # per block: tiles kept by the lower-bound mask
    visible: list = field(default_factory=list)  # per block: (nQ, nK) tiles with any visible pair
    dense_passes: int = 1


def lower_bound_mask(tile_gap: torch.Tensor, lower: torch.Tensor, tau_low: torch.Tensor, empty: torch.Tensor,
                     block_m: int):
    """(B, H, nQ, nK) bool: a tile is kept when its gap (``stats.Maxima``) exceeds the smallest
    ``lower bound of tau - tau_low`` among its rows (``tau_low``: ``stats.tau_low`` of the final
    row max and the tau floor the gaps were taken against; it bounds tau from below too, so the
    larger of the two bounds is taken). A key with p > 0 has z > tau >= max(lower, tau_low), so its
    tile's gap is at least ``z - tau_low > max(lower - tau_low, 0)``: no nonzero tile is dropped."""
    above_low = (lower - tau_low).clamp(min=0)
    bound = torch.where(empty, torch.full_like(lower, float("inf")), above_low - S.MASK_MARGIN)
    return tile_gap > S.per_query_tile(bound, block_m, "min")[..., None]


def statistics_pass(backend, q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int):
    """Statistics of q against one key block alone, ``(RowStats, tile_gap)``: the max pass, then
    the histogram pass against this block's own row max (the one-block case of the forward's
    steps 1 and 2; ``stats.merge`` combines the results of several blocks exactly)."""
    row_max, _, tile_gap = backend.max_pass(q, k, vis, scale_z, block_m, block_n, alpha=None)
    active = S.histogram_mask(tile_gap)  # every kept bin complete: the statistics merge with any others
    hist, tile_gap = backend.histogram_pass(q, k, vis, scale_z, block_m, block_n, row_max, tile_gap, active)
    return S.RowStats(row_max, hist), tile_gap


def tiles_needed(mask: torch.Tensor) -> torch.Tensor:
    """(nK,) bool: key tiles of a block that any query tile of any head needs."""
    return mask.flatten(0, -2).any(0)


def _needed(blocks: KeyBlocks, masks: list):
    return [tiles_needed(m) for m in masks] if blocks.reads_needed else None


class LocalReduce:
    """How partial results of one query block are combined beyond the blocks this rank visits.

    One device and the ring visit every key block locally, so nothing is left to combine. A
    strategy whose key blocks live on other ranks (queries replicated, keys sharded) overrides
    these with all-reduces; each is called the same number of times on every rank.
    """

    def row_max(self, row_max: torch.Tensor) -> torch.Tensor:
        return row_max

    def histogram(self, hist: torch.Tensor) -> torch.Tensor:
        return hist

    def sums(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def outputs(self, parts: list) -> list:
        return parts

    def grad_q(self, dq: torch.Tensor) -> torch.Tensor:
        return dq


def entmax_forward(backend, q: torch.Tensor, blocks: KeyBlocks, alpha: float, softmax_scale: float,
                   reduce: LocalReduce = LocalReduce()) -> ForwardResult:
    """Exact alpha-entmax attention of ``q`` (B, Sq, Hq, D) against all key blocks."""
    scale_z = (alpha - 1.0) * softmax_scale
    bm, bn = backend.BLOCK_M, backend.BLOCK_N
    row_max: list = [None]
    tau_floor: list = [None]
    tile_gap: list = [None] * blocks.num_blocks
    visible: list = [None] * blocks.num_blocks

    def maxima(index, k, _, vis):
        # the running max carries over from block to block: gaps of later blocks come out tighter;
        # the tau floor comes from the first block (one's own keys: the diagonal under causal)
        row_max[0], tau_floor[0], tile_gap[index] = backend.max_pass(q, k, vis, scale_z, bm, bn, alpha,
                                                                     row_max[0], tau_floor[0])
        visible[index] = torch.isfinite(tile_gap[index]).flatten(0, -3).any(0)

    blocks.visit(maxima, with_values=False)
    row_max, tau_floor = reduce.row_max(row_max[0]), tau_floor[0]
    # only these tiles can hold a key the bracket reads; histogram_pass marks the rest zero
    histogram_tiles = [S.histogram_mask(t) for t in tile_gap]
    hist: list = [None]

    def histogram(index, k, _, vis):
        part, tile_gap[index] = backend.histogram_pass(q, k, vis, scale_z, bm, bn, row_max, tile_gap[index],
                                                       histogram_tiles[index], tau_floor)
        hist[0] = part if hist[0] is None else hist[0] + part

    blocks.visit(histogram, with_values=False, needed=_needed(blocks, histogram_tiles),
                 pass_name="histogram")
    row_stats = S.RowStats(row_max, reduce.histogram(hist[0]))
    del histogram_tiles
    bracket = backend.coarse_bracket(row_stats, alpha)
    tau_low = S.tau_low(row_max, tau_floor)
    active = [lower_bound_mask(t, bracket.lower, tau_low, bracket.empty, bm) for t in tile_gap]

    def summed(masks, **kwargs):
        total: list = [None]
        keeps: list = [None] * blocks.num_blocks

        def refine(index, k, _, vis):
            part, keeps[index] = backend.refine_pass(q, k, vis, scale_z, bm, bn, masks[index], **kwargs)
            total[0] = part if total[0] is None else total[0] + part

        blocks.visit(refine, with_values=False, needed=_needed(blocks, masks))
        return reduce.sums(total[0]), keeps

    if S.is_closed_form(alpha):
        # rows whose max is their only key near tau have tau = max - 1: the refinement pass reads
        # only the query tiles with another row
        refined = S.per_query_tile(~bracket.single, bm, "any")
        fine, keeps = summed([a & refined[..., None] for a in active], bin_index=bracket.bin_index,
                             low=tau_low - S.MASK_MARGIN)  # keys below have p = 0
        tau = backend.fine_tau(bracket, fine, alpha)
        # block mask from the exact tau (a key with p > 0 has z > tau), and where the refinement
        # pass ran, also its per-row test (some row has a key at most a bin below its pair of bins)
        active = [lower_bound_mask(t, tau, tau_low, bracket.empty, bm) & (keep | ~refined[..., None])
                  for t, keep in zip(tile_gap, keeps)]
    else:
        point, lower, upper = bracket.estimate, bracket.lower.double(), bracket.upper
        for _ in range(S.NEWTON_STEPS):
            sums, _ = summed(active, point=point, alpha=alpha)
            point, lower, upper = S.newton_update(point, lower, upper, sums, alpha)
        tau = S.finalize_tau(point, bracket.empty)
    del tile_gap  # float32 per tile: the bool masks are all the output pass needs
    needed = _needed(blocks, active)

    parts: list = [None]
    nonzero: list = [None] * blocks.num_blocks

    def output(index, k, v, vis):
        *acc, nonzero[index] = backend.output_pass(q, k, v, vis, scale_z, alpha, tau, bm, bn, active[index])
        parts[0] = acc if parts[0] is None else [a + b for a, b in zip(parts[0], acc)]

    blocks.visit(output, with_values=True, needed=needed)
    out, out_u, u_sum, support = reduce.outputs(parts[0])
    return ForwardResult(out, out_u, u_sum, tau, support, nonzero, active, visible)


def entmax_backward(backend, q, grad_out, blocks: KeyBlocks, fwd: ForwardResult, alpha: float, softmax_scale: float,
                    reduce: LocalReduce = LocalReduce(), kv_grad_dtype: torch.dtype | None = None):
    """Returns dq (B, Sq, Hq, D) and the local block's dk, dv, in the compute dtype (fp32/fp64);
    ``kv_grad_dtype``: the dtype of dk and dv where the caller takes them as final (one key block:
    the kernel then stores them once, with no cast after)."""
    if kv_grad_dtype is not None and blocks.num_blocks != 1:
        raise ValueError(f"kv_grad_dtype needs one key block, whose dk and dv are final; got {blocks.num_blocks}")
    scale_z = (alpha - 1.0) * softmax_scale
    bm, bn = backend.BLOCK_M, backend.BLOCK_N
    dq_total: list = [None]
    delta: list = [None]  # the row term, computed with the first block's dq (one launch fewer)

    def gradients(index, k, v, vis):
        dq, dk, dv, delta[0] = backend.backward_pass(q, k, v, grad_out, vis, scale_z, softmax_scale, alpha, fwd.tau,
                                                     delta[0], bm, bn, fwd.nonzero[index], kv_grad_dtype,
                                                     fwd.out_u, fwd.u_sum)
        dq_total[0] = dq if dq_total[0] is None else dq_total[0] + dq
        return dk, dv

    dk, dv = blocks.visit_backward(gradients, needed=_needed(blocks, fwd.nonzero))
    return reduce.grad_q(dq_total[0]), dk, dv


class SingleBlock:
    """All keys in one block: the one-device case."""

    num_blocks = 1
    reads_needed = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor, vis: Visibility):
        self.k, self.v, self.vis = k, v, vis

    def visit(self, fn, with_values: bool, needed=None, pass_name=None) -> None:
        fn(0, self.k, self.v if with_values else None, self.vis)

    def visit_backward(self, fn, needed):
        return fn(0, self.k, self.v, self.vis)
