"""Test-only helpers around the kernels: one key block's statistics alone, and their exact merge.

The forward never needs these (it takes every block's histogram against the global row max, so
histograms add); they state the property that makes key shards combinable in any order.
"""
from __future__ import annotations

import torch

from ring_adasplash.kernels import EntmaxSpec
from ring_adasplash.kernels import stats as S


def problem(backend, q, k, vis, scale_z: float, alpha: float = 1.5, v=None):
    """A ``Problem`` of ``backend`` whose logits are ``scale_z * q . k`` for this ``alpha``."""
    spec = EntmaxSpec(alpha)
    return backend.problem(q, k, v, vis, spec, scale_z / (alpha - 1.0))


def no_floor(problem_) -> torch.Tensor:
    """A tau floor of -inf everywhere: gaps against ``row max - 1`` alone."""
    return torch.full(problem_.rows, float("-inf"), device=problem_.q.device)


def statistics_pass(backend, q, k, vis, scale_z: float):
    """Statistics of q against one key block alone, ``(RowStats, tile_gap)``: the max pass with no
    tau floor, then the histogram pass against this block's own row max, on every tile that may
    hold a kept key (so every kept bin is complete and the result merges with any other)."""
    prob = problem(backend, q, k, vis, scale_z)
    row_max, floor, tile_gap = backend.max_pass(prob, tau_floor=no_floor(prob))
    tiles = prob.block_mask(S.histogram_mask(tile_gap))
    hist, tile_gap = backend.histogram_pass(prob, row_max, None, tile_gap, tiles)
    return S.RowStats(row_max, hist), tile_gap


def shift_bins(hist: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move local bins ``shift`` (>= 0, per row) places down; bins pushed past the last are dropped."""
    nb = hist.shape[-1]
    target = torch.arange(nb, device=hist.device)
    source = target - shift.to(torch.int64)[..., None]  # (B, H, S, NB)
    valid = (source >= 0) & (source < nb)
    gathered = torch.gather(hist, -1, source.clamp(0, nb - 1))
    return torch.where(valid, gathered, torch.zeros((), dtype=hist.dtype, device=hist.device))


def merge(a: S.RowStats, b: S.RowStats) -> S.RowStats:
    """Exact merge of the statistics of two disjoint key sets for the same queries."""
    row_max = torch.maximum(a.row_max, b.row_max)
    ref = S.bin_reference(row_max)
    hist_a = shift_bins(a.hist, (ref - S.bin_reference(a.row_max)).clamp(0, S.NUM_BINS))
    hist_b = shift_bins(b.hist, (ref - S.bin_reference(b.row_max)).clamp(0, S.NUM_BINS))
    return S.RowStats(row_max, hist_a + hist_b)
