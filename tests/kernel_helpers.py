"""Test-only helpers around the kernels: one key block's statistics alone.

The forward takes every block's statistics against the score max over all blocks (``stats.Relative``),
so that histograms and sums of key shards add exactly; these helpers run the same passes on one
block, against its own score max or a given one.
"""
from __future__ import annotations

import torch

from ring_adasplash.kernels import EntmaxSpec
from ring_adasplash.kernels import stats as S


def problem(backend, q, k, vis, scale_z: float, alpha: float = 1.5, v=None, shift=None):
    """A ``Problem`` of ``backend`` whose logits are ``scale_z * (q . k - shift)`` for this
    ``alpha`` (``shift`` None: raw scores, as the max pass reads them)."""
    spec = EntmaxSpec(alpha)
    return backend.problem(q, k, v, vis, spec, scale_z / (alpha - 1.0), shift)


def no_floor(problem_) -> torch.Tensor:
    """A tau floor of -inf everywhere: gaps against ``row max - 1`` alone."""
    return torch.full(problem_.rows, float("-inf"), device=problem_.q.device)


def statistics_pass(backend, q, k, vis, scale_z: float, score_max=None):
    """Statistics of q against one key block alone, ``(RowStats, gap_codes, Relative)``: the max
    pass with no tau floor, then the histogram pass against ``score_max`` (default: this block's
    own), on every tile that may hold a kept key (so every kept bin is complete)."""
    raw = problem(backend, q, k, vis, scale_z)
    maxima = backend.max_pass(raw, tau_floor=no_floor(raw))
    rel = S.relative(maxima.score_max if score_max is None else score_max, maxima.tau_floor, scale_z)
    shifted = problem(backend, q, k, vis, scale_z, shift=rel.shift)
    codes = maxima.gap_codes
    tiles = shifted.block_mask(S.histogram_mask(codes))
    hist, codes = backend.histogram_pass(shifted, rel.row_max, None, codes, tiles)
    return S.RowStats(rel.row_max, hist), codes, rel
