"""Mergeable per-row statistics of entmax logits, and the threshold ``tau`` they determine.

Notation, used in every backend. ``z_ij = (alpha - 1) * softmax_scale * (q_i . k_j - m_i)`` are the
entmax logits of visible pairs, relative to the row's largest raw score ``m_i = max_j q_i . k_j``
(``Relative``), ``gamma = 1 / (alpha - 1)`` and ``p_ij = [z_ij - tau_i]_+ ** gamma`` with
``sum_j p_ij = 1``. Since no ``p`` exceeds 1, ``tau_i >= max_j z_ij - 1``: keys more than one unit
below the row max never matter. Relative logits make every pass independent of a constant added
to a row's scores (entmax is shift invariant, and float32 near 1e4 has ulps of 1e-3): the row max
is z = 0 and tau lies in [-1, 0]. Only the max pass reads raw scores, to find ``m``.

Coarse histogram (the histogram pass). Bins have width ``w = 1 / (NUM_BINS - 1)`` and indices
``idx(z) = floor(z * (NUM_BINS - 1))`` of the relative logit. A row keeps the ``NUM_BINS`` bins below
its reference ``K = idx(row max)`` (0 for relative logits): local bin ``b = K - idx(z)``, covering
``[(K - b) w, (K - b + 1) w)``, and counts the keys in each. Bins further down hold only
``z < max - 1`` and are dropped. The forward takes every key block's histogram against the score
max over all blocks (the same shift on every shard), so every shard bins a score the same way and
histograms of key shards add exactly (an all-reduce sums them; the tests check it).

Counts bound the sum at every bin edge from both sides (a key of a bin lies between its edges), and
the upper bound at one edge is the lower bound at the next, so they place tau in one of two
adjacent bins (``coarse_bracket``). Counts alone, rather than counts and moments, because a count is
one add per key where moments need a pass per distinct bin of a row; the fine histogram pass takes the
moments instead, exact, for the keys above that pair of bins.

Fine histogram (the fine histogram pass). For alpha 1.5 and 2 it splits the pair of bins into
``FINE_BINS`` sub-bins with count, sum v, sum v^2 (v the position inside the sub-bin), and sums
count, sum y, sum y^2 of the keys above the pair (y their height above it, in bins); these are
exact, additive across shards, and all the closed-form solve needs: the sum at a sub-bin edge is a
polynomial in them. The final solve is closed form on the exact sums above the sub-bin that holds
``tau`` plus a two-point model of that sub-bin (exact when it holds at most two keys). Other alpha:
Newton steps on exact sums ``(sum (z - t)_+^gamma, sum (z - t)_+^(gamma - 1))`` at the current estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .entmax_spec import EntmaxSpec

NUM_BINS = 16  # coarse bins, width 1 / 15 in z
FINE_BINS = 64  # sub-bins of the two bins that may hold tau: final bracket 1 / 480 wide
# Newton sums passes for alpha other than 1.5 and 2 (``newton_update``), from the counts' lower bound
NEWTON_STEPS = 5
# Newton sums passes after the closed form (alpha 1.5 and 2) on the rows it leaves inexact
# (``two_point_exact``), from within a sub-bin of tau
POLISH_STEPS = 2
NO_STOP = -1.0  # tolerances of ``newton_step`` that stop no row: a fixed number of steps
# The Newton schedule (``algorithm``): at most this many Newton sums passes from the max pass's
# lower bound of tau; a row stops once a step moves its tau by at most NEWTON_STEP_TOLERANCE (the
# steps converge quadratically: the error left is about the square of the step; a bound on the mass
# the step moves would sit below the float32 noise of the sums on rows of many keys), or once tau
# is bracketed within NEWTON_TOLERANCE of the sum of p (the width times the slope
# gamma sum (z - t)_+^(gamma - 1): a flat row of n keys moves sqrt(n) times more mass per unit of
# tau than a row of one key)
NEWTON_SCHEDULE_STEPS = 10
# from this step on, the passes mark the tiles that may hold p > 0 (and, pass by pass, drop the
# tiles below every row's lower bound), and in one launch take each row's smallest gap above its
# point with the marks, with which the closed form of alpha 1.5 stops a row exactly (``newton_step``)
NEWTON_NARROW_STEP = 2
# the one-launch schedule takes its second sweep (step 1) at the upper bound that its first gave,
# where it gave one, and there stops a row exactly from above (``newton_step``'s ``above``)
NEWTON_UPPER_STEP = 1
NEWTON_STEP_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}
NEWTON_TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-12}
MASK_MARGIN = 1e-4  # slack (in z) when comparing a tile gap with a lower bound of tau


class Relative(NamedTuple):
    """The max pass's raw maxima (``backend.Maxima``) as the later passes read them.

    ``shift``: (B, H, Sq) the row's score max, subtracted from every raw score (0 on rows without
    a finite one, so no pass computes inf - inf). ``row_max``: z of the row max: 0, -inf on rows
    with no visible key or a non-finite score. ``tau_floor``: the tau floor in z. ``nonfinite``:
    rows that see a score that is not finite (their output is NaN; the statistics treat them as
    empty). ``reference``: ``gap_reference(row_max, tau_floor)``, the lower bound of tau that the
    tile gaps are measured against. ``empty``: the rows whose ``row_max`` is -inf."""

    shift: torch.Tensor
    row_max: torch.Tensor
    tau_floor: torch.Tensor
    nonfinite: torch.Tensor
    reference: torch.Tensor
    empty: torch.Tensor


def relative(score_max: torch.Tensor, tau_floor: torch.Tensor, scale_z: float | torch.Tensor) -> Relative:
    """``Relative`` from the merged score max and the tau floor (raw units) of the max pass
    (``scale_z``: a float, or per head (H, 1), ``EntmaxSpec.scale_z_at``). The floor's difference
    to the max is exact in float arithmetic wherever it matters (within a factor two of each
    other), so z of the floor loses nothing to the size of the scores."""
    has = torch.isfinite(score_max)
    shift = torch.where(has, score_max, torch.zeros_like(score_max))
    row_max = torch.where(has, torch.zeros_like(score_max), torch.full_like(score_max, float("-inf")))
    floor = torch.where(has, scale_z * (tau_floor.to(score_max.dtype) - shift), row_max)
    return Relative(shift, row_max, floor, score_max == float("inf"), gap_reference(row_max, floor), ~has)


@dataclass
class RowStats:
    """Statistics of one query block against the keys seen so far (a shard or the whole sequence).

    ``row_max``: (B, H, Sq) float32 (float64 for float64 inputs), max logit over visible keys (0, as
    logits are relative to it; -inf for none).
    ``hist``: (B, H, Sq, NUM_BINS) float32: keys per local bin (see module doc).
    """

    row_max: torch.Tensor
    hist: torch.Tensor


def bin_reference(row_max: torch.Tensor) -> torch.Tensor:
    """Integer reference ``K = floor(max * (NUM_BINS - 1))`` as float; a huge negative for empty rows."""
    ref = torch.floor(row_max * (NUM_BINS - 1))
    return torch.where(torch.isfinite(ref), ref, torch.full_like(ref, -1e9))


def per_query_tile(rows: torch.Tensor, block_m: int, reduce: str) -> torch.Tensor:
    """(..., Sq) -> (..., nQ): ``reduce`` ("max", "min" or "any") over the rows of each query
    tile; the padding rows of a last, partial tile change nothing."""
    fill = {"max": float("-inf"), "min": float("inf"), "any": False}[reduce]
    pad = (-rows.shape[-1]) % block_m
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad), value=fill)
    tiles = rows.view(*rows.shape[:-1], -1, block_m)
    return tiles.amax(-1) if reduce == "max" else tiles.amin(-1) if reduce == "min" else tiles.any(-1)


def lower_bound_mask(gap_codes: torch.Tensor, lower: torch.Tensor, reference: torch.Tensor, empty: torch.Tensor,
                     block_m: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, nQ, nK) bool: a tile is kept when its gap (``backend.Maxima``, as ``encode_gaps``
    keeps it: rounded up) exceeds the smallest ``lower - reference`` among its rows (``lower``: a
    lower bound of tau; ``reference``: ``gap_reference`` of the final row max and tau floor, which
    bounds tau from below too, so the larger of the two bounds is taken). A key with p > 0 has
    z > tau >= max(lower, reference), so its tile's gap is at least ``z - reference >
    max(lower - reference, 0)``: no nonzero tile is dropped. ``within`` (B, H, nQ, nK) bool: only
    its tiles can be kept (the mask is and-ed with it)."""
    above = (lower - reference).clamp(min=0)
    bound = torch.where(empty, torch.full_like(lower, float("inf")), above - MASK_MARGIN)
    kept = gap_codes > code_threshold(per_query_tile(bound, block_m, "min"))[..., None]
    return kept if within is None else kept & within


HISTOGRAM_MARGIN = 1e-3  # slack (in z) of ``histogram_mask`` for logits recomputed by another kernel
FLOOR_STEPS = 3  # Newton steps of the tau floor: within a few hundredths of the tau of the nearest keys
FLOOR_MARGIN = 1e-4  # the tau floor is lowered by this much: float32 rounding of the sums it tests
COLUMN_STEPS = 4  # gamma-norm Newton steps of the column floor (``column_tau``)

# Tile gaps are kept between passes as one byte per tile (``encode_gaps``), not a float32: the
# per-tile state is what grows with Sq x Sk (the memory issue). Every test of a gap compares it
# with a threshold in [GAP_LOW, GAP_HIGH]: ``histogram_mask``'s, the lowest, and
# ``lower_bound_mask``'s, at most 1 (tau - (max - 1)) less MASK_MARGIN. Codes: GAP_NONE, no visible
# pair; GAP_ZERO, a visible tile whose gap lies below every threshold (or that holds provably no
# p > 0, ``histogram_pass``); 2-254, a gap in (GAP_LOW + (c - 2) GAP_STEP, GAP_LOW + (c - 1)
# GAP_STEP], read as the upper end; 255, a gap above GAP_HIGH (or NaN), kept by every test.
# Rounding up only adds tiles to a mask: a tile whose gap lies within GAP_STEP (about 1/250 in z)
# above a threshold is read where the float gap would have dropped it.
GAP_NONE, GAP_ZERO, GAP_ABOVE = 0, 1, 255
GAP_LOW = -1.0 / (NUM_BINS - 1) - HISTOGRAM_MARGIN - 1e-6
GAP_HIGH = 1.0
GAP_STEP = (GAP_HIGH - GAP_LOW) / 253
GAP_ROUNDING = 1e-3  # in steps: far above the float32 rounding of the codes' edges


def encode_gaps(tile_gap: torch.Tensor) -> torch.Tensor:
    """The tile gaps (float32, -inf where a tile has no visible pair) as uint8 codes (see above):
    the code of a gap is 1 + the number of edges GAP_LOW + j GAP_STEP (j = 0 ... 253) below it.
    Few ops (a forward makes codes for every key block): a bucketing, then -inf marked."""
    edges = torch.linspace(GAP_LOW, GAP_HIGH, 254, device=tile_gap.device, dtype=tile_gap.dtype)
    codes = torch.bucketize(tile_gap, edges, out_int32=True).to(torch.uint8).add_(1)  # NaN: past every edge
    return codes.masked_fill_(tile_gap == float("-inf"), GAP_NONE)


def code_threshold(bound: torch.Tensor) -> torch.Tensor:
    """Thresholds for gap codes: ``code > code_threshold(bound)`` keeps every tile whose gap may
    exceed ``bound`` (a code's gap is at most its upper edge GAP_LOW + (code - 1) GAP_STEP, up to
    GAP_ROUNDING); GAP_ZERO where it lies below GAP_LOW, 254 (only gaps above GAP_HIGH kept) above
    GAP_HIGH, 255 (nothing kept) where ``bound`` is +inf."""
    steps = ((bound - GAP_LOW) / GAP_STEP - GAP_ROUNDING).floor_().clamp_(min=0, max=253)
    return steps.add_(1).masked_fill_(bound == float("inf"), GAP_ABOVE)


def gap_reference(row_max: torch.Tensor, tau_floor: torch.Tensor | None = None) -> torch.Tensor:
    """The lower bound of tau that tile gaps are measured against: ``max(tau floor, row max - 1)``
    (no p exceeds 1, so tau >= max - 1; ``row max - 1`` alone without a floor). Along the max pass
    it only grows, so a gap taken against it bounds from above how far a tile's keys rise over the
    final one."""
    return row_max - 1.0 if tau_floor is None else torch.maximum(tau_floor, row_max - 1.0)


def kept_bins(row_max: torch.Tensor, tau_floor: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Sq) float32: how many local bins (from bin 0, the row max's) the coarse histogram
    fills: ``NUM_BINS``, or fewer where the bin of the tau floor lies higher (``histogram_mask``).
    At least 1. The floor is lowered by ``HISTOGRAM_MARGIN`` first, as in ``histogram_mask``."""
    ref = bin_reference(row_max)
    bins = torch.full_like(ref, float(NUM_BINS))
    if tau_floor is not None:
        floor_bin = torch.floor((tau_floor - HISTOGRAM_MARGIN) * (NUM_BINS - 1))
        bins = torch.where(torch.isfinite(floor_bin), (ref - floor_bin + 1).clamp(1, NUM_BINS), bins)
    return bins.float().contiguous()


def histogram_mask(gap_codes: torch.Tensor) -> torch.Tensor:
    """(B, H, nQ, nK) bool: tiles that may hold a key the coarse bracket reads: a key at or above
    the bin holding ``gap_reference`` (bins of width ``w = 1 / (NB - 1)``), so ``z > gap_reference - w``, so its
    tile's gap exceeds ``-w``.

    Such keys lie in the kept bins, the lowest of which holds max - 1 <= gap_reference; every key of any
    other tile has ``z < gap_reference <= tau``: p = 0 there. Kept bins below the bin of ``gap_reference`` may
    miss keys (none when gap_reference = max - 1), which the bracket never notices: the counts its edge
    bounds read are complete down to that bin, and there the bounds already reach 1 since
    tau >= gap_reference (``coarse_bracket``). Gaps come from the max pass of one key block, against a
    running max that may include earlier blocks, and against the tau floor of the first; the test
    reads their codes (``encode_gaps``), whose lowest threshold GAP_LOW lies just below ``-w``
    less HISTOGRAM_MARGIN."""
    return gap_codes > GAP_ZERO


# ----------------------------------------------------------------------------------------------
# tau from statistics (float64, tiny tensors)
# ----------------------------------------------------------------------------------------------


@dataclass
class Bracket:
    """Where tau lies after the coarse pass, per row (B, H, Sq), in z units unless noted.

    ``lower``: a guaranteed lower bound of tau (builds the block mask: it never drops a nonzero tile).
    ``bin_index``: absolute coarse index of the lower of the two bins that hold tau (closed-form
    alpha; tau lies in ``[bin_index w, (bin_index + 2) w)``), as float64.
    ``estimate``: the start of the Newton steps (other alpha; None where only the closed form
    runs): ``lower`` in float64, at or below tau.
    ``upper``: an upper bound of tau (other alpha; likewise).
    ``empty``: rows with no visible key.
    ``single``: (closed-form alpha, else None) rows where the max is the only key at or above
    the pair: it alone has p > 0, p = 1, so tau = row max - 1, and ``lower`` holds that tau. The
    fine histogram pass can skip query tiles made only of such rows (and empty ones).
    """

    lower: torch.Tensor
    bin_index: torch.Tensor
    estimate: torch.Tensor
    upper: torch.Tensor
    empty: torch.Tensor
    single: torch.Tensor | None = None


def _cumsum_bins(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum over the (short) bin axis as a product with a triangular matrix: on GPUs a
    float64 cumsum over 16 or 64 entries of millions of rows is far slower than the matmul."""
    n = x.shape[-1]
    ones = torch.ones(n, n, dtype=x.dtype, device=x.device)
    return x @ (ones.tril() if reverse else ones.triu())  # [j, b] = 1 for j <= b (j >= b reversed)


def _upper_edge_sums(count: torch.Tensor, gamma: float) -> torch.Tensor:
    """``U_b = sum_{j <= b} count_j (b - j + 1)^gamma``, gamma in {1, 2}: an upper bound of the sum
    ``F_b = sum (z - edge_b)_+^gamma / w^gamma`` at the lower edge of local bin b, since a key of bin
    j <= b lies less than ``b - j + 1`` bin widths above it. ``U_{b-1}`` bounds ``F_b`` from below
    (the keys of bins j < b lie at least ``b - j`` above edge b)."""
    j = torch.arange(count.shape[-1], device=count.device, dtype=torch.float64)
    c_cum = _cumsum_bins(count)
    m1 = _cumsum_bins(j * count)
    reach = j + 1  # (b + 1) per edge b
    if gamma == 1.0:
        return reach * c_cum - m1
    m2 = _cumsum_bins(j * j * count)
    return reach * reach * c_cum - 2 * reach * m1 + m2


def coarse_bracket(stats: RowStats, spec: EntmaxSpec) -> Bracket:
    """Bracket tau from merged coarse counts.

    Closed-form alpha: with ``b_a`` the first local bin whose ``U_b`` reaches 1 (in bin units
    ``(NB - 1)^gamma``), ``F_b <= U_b < 1`` for b < b_a, and ``F_{b_a + 1} >= U_{b_a} >= 1``: tau's
    bin is local b_a or b_a + 1, the pair starting at absolute bin ``K - b_a - 1``. b_a is at most
    the bin of ``max - 1 <= tau`` (and of the tau floor, whose bins the histogram fills).

    Every key with p > 0 lies at or above the pair and in a bin the histogram fills completely
    (above gap_reference): if those bins hold one key, it is the max, and tau = max - 1 (``single``)."""
    w = 1.0 / (NUM_BINS - 1)
    ref = bin_reference(stats.row_max).double()
    empty = ~torch.isfinite(stats.row_max)
    nb = NUM_BINS
    bins = torch.arange(nb, device=ref.device, dtype=torch.float64)
    count = stats.hist.double()
    if spec.closed_form:
        gamma = spec.gamma
        target = w ** (-gamma)  # sum_j p_j = 1 in bin-width units
        b_a = (_upper_edge_sums(count, gamma) < target).sum(-1).clamp(max=nb - 1)
        bin_index = ref - b_a.double() - 1
        lower = bin_index * w
        # keys at or above the pair (bins the histogram fills completely wherever p > 0 is possible)
        keys_from_pair = torch.gather(_cumsum_bins(count), -1, (b_a + 1).clamp(max=nb - 1)[..., None]).squeeze(-1)
        single = (keys_from_pair == 1) | empty
        lower = torch.where(single & ~empty, stats.row_max.double() - 1.0, lower)
        return Bracket(lower.to(stats.row_max.dtype), bin_index, lower, lower + 2 * w, empty, single)
    # Other alpha: bound the sum at each bin edge with every key at its bin's edges, in z units (a
    # power of a distance in bins overflows as alpha -> 1); tau >= row max - 1 in any case
    # [0, h, j, b] = (b - j) w; h: the head, or one for every head
    dist = ((bins[None, :] - bins[:, None]) * w).expand(1, count.shape[1] if spec.per_head else 1, nb, nb)
    gamma = spec.gamma_at(dist)
    f_low = count @ (dist.clamp(min=0) ** gamma * (dist > 0))  # (B, H, Sq, NB)
    f_high = count @ ((dist + w).clamp(min=0) ** gamma * (dist >= 0))
    b_lo = (f_low < 1.0).sum(-1).clamp(max=nb - 1).double()
    b_hi = ((f_high < 1.0).sum(-1) - 1).clamp(min=0).double()  # last edge with F surely < 1
    lower = torch.maximum((ref - b_lo) * w, stats.row_max.double() - 1.0)
    upper = (ref - b_hi + 1) * w
    return Bracket(lower.to(stats.row_max.dtype), ref - b_lo, lower, upper, empty)


def _poly_root(n0, n1, n2, target, gamma):
    """Smallest t with sum (x - t)^gamma = target for keys above t, from moments n0, n1, n2 of x."""
    if gamma == 1.0:
        return (n1 - target) / n0.clamp(min=1e-30)
    disc = (n1 * n1 - n0 * (n2 - target)).clamp(min=0)
    return (n2 - target) / (n1 + disc.sqrt()).clamp(min=1e-30)


def _sub_bin_moments(fine_hist: torch.Tensor):
    """From the fine sums (``fine_tau``): per sub-bin s, the count and the sums of x and x^2 of
    its keys (``fc``, ``x1``, ``x2``, (..., FINE_BINS)), and count, sum x, sum x^2 of the keys in
    sub-bins >= s plus those above the pair (``n0``, ``n1``, ``n2``, reverse cumulative), all in
    units of the coarse bin above the pair's lower edge; ``above``: the last three of the keys
    above the pair alone."""
    nf = fine_hist.shape[-1] - 1
    h = 2.0 / nf
    fine_hist = fine_hist.double()
    a0, y1, y2 = fine_hist[..., nf].unbind(-1)
    above = (a0, 2 * a0 + y1, 4 * a0 + 4 * y1 + y2)
    fc, fv1, fv2 = fine_hist[..., :nf].unbind(-2)
    s = torch.arange(nf, device=fc.device, dtype=torch.float64)
    x1 = (fc * s + fv1) * h  # sum of x over sub-bin s
    x2 = (fc * s * s + 2 * s * fv1 + fv2) * (h * h)
    cumulative = tuple(a[..., None] + _cumsum_bins(x, reverse=True) for a, x in zip(above, (fc, x1, x2)))
    return (fc, x1, x2), cumulative, above


def _sum_at(t, moments, gamma: float):
    """``sum (x - t)^gamma`` over keys with moments (count, sum x, sum x^2), gamma in {1, 2}."""
    m0, m1, m2 = moments
    return m1 - t * m0 if gamma == 1.0 else m2 - 2 * t * m1 + t * t * m0


def _two_point_root(strictly_above, count, sum_x, sum_x2, lo_edge, hi_edge, target, gamma: float):
    """tau inside the sub-bin ``[lo_edge, hi_edge)`` that holds it: the keys strictly above it
    (exact moments) plus its own ``count`` keys as two points at mean -+ spread, half each (exact
    for at most two keys)."""
    mean = torch.where(count > 0, sum_x / count.clamp(min=1), lo_edge)
    var = torch.where(count > 0, sum_x2 / count.clamp(min=1) - mean * mean, torch.zeros_like(mean)).clamp(min=0)
    spread = var.sqrt()
    p1 = (mean - spread).clamp(lo_edge, hi_edge)
    p2 = (mean + spread).clamp(lo_edge, hi_edge)
    half = 0.5 * count
    h0, h1, h2 = strictly_above

    def with_points(w1, w2):
        return (h0 + w1 * half + w2 * half, h1 + w1 * half * p1 + w2 * half * p2,
                h2 + w1 * half * p1 * p1 + w2 * half * p2 * p2)

    both, upper_only, none = with_points(1.0, 1.0), with_points(0.0, 1.0), with_points(0.0, 0.0)
    root_both = _poly_root(*both, target, gamma)
    root_upper = _poly_root(*upper_only, target, gamma)
    root_none = _poly_root(*none, target, gamma)
    f_p1 = _sum_at(p1, upper_only, gamma)  # at t = p1 the lower point contributes 0
    f_p2 = _sum_at(p2, none, gamma)
    tau_rel = torch.where(f_p1 <= target, root_both, torch.where(f_p2 <= target, root_upper, root_none))
    return tau_rel.clamp(lo_edge, hi_edge)


def fine_tau(bracket: Bracket, fine_hist: torch.Tensor, spec: EntmaxSpec) -> torch.Tensor:
    """tau (B, H, Sq) for alpha in {1.5, 2} from the refinement sums, in their dtype (float32, or
    float64 for float64 inputs).

    ``fine_hist`` (B, H, Sq, 3, FINE_BINS + 1): per sub-bin of the pair of bins (``Bracket``),
    count, sum v, sum v^2; in the last column count, sum y, sum y^2 of the keys above the pair.
    Works in units of the coarse bin, relative to the lower edge ``L`` of the pair: a key of
    sub-bin s sits at ``x = (s + v) h`` with ``h = 2 / FINE_BINS``, a key above at ``x = 2 + y``.
    """
    gamma = spec.gamma
    w = 1.0 / (NUM_BINS - 1)
    nf = fine_hist.shape[-1] - 1
    h = 2.0 / nf
    (fc, x1, x2), (n0, n1, n2), above = _sub_bin_moments(fine_hist)
    edge = torch.arange(nf, device=fc.device, dtype=torch.float64) * h
    target = w ** (-gamma)
    f_edge = _sum_at(edge, (n0, n1, n2), gamma)
    s_star = ((f_edge >= target).sum(-1) - 1).clamp(0, nf - 1)  # last sub-edge with F >= target
    pick = lambda t: torch.gather(t, -1, s_star[..., None]).squeeze(-1)  # noqa: E731
    nxt = (s_star + 1).clamp(max=nf - 1)[..., None]
    has_next = (s_star + 1 < nf)
    # keys strictly above sub-bin s_star
    strictly_above = [torch.where(has_next, torch.gather(n, -1, nxt).squeeze(-1), a)
                      for n, a in zip((n0, n1, n2), above)]
    lo_edge = s_star.double() * h
    tau_rel = _two_point_root(strictly_above, pick(fc), pick(x1), pick(x2), lo_edge, lo_edge + h, target, gamma)
    tau = (bracket.bin_index + tau_rel) * w
    if bracket.single is not None:  # the fine histogram pass may not have read these rows
        tau = torch.where(bracket.single, bracket.lower.double(), tau)
    return torch.where(bracket.empty, torch.full_like(tau, float("inf")), tau).to(fine_hist.dtype)


def two_point_exact(bracket: Bracket, fine_hist: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq) bool: rows whose ``fine_tau`` is exact: the sub-bin that holds tau has at most two
    keys, which its two-point model reproduces (count, sum and sum of squares fix two points), or
    the row has one key above the pair or none. Other rows (flat rows: many keys within 1/480 of
    tau) need ``newton_update`` steps on exact sums. Decided a hundredth of a sub-bin on either
    side of tau, so that rounding of tau near a sub-bin edge looks at both sub-bins."""
    nf = fine_hist.shape[-1] - 1
    sub_bins = (torch.nan_to_num(tau.double(), posinf=0.0) * (NUM_BINS - 1) - bracket.bin_index) * (nf / 2)
    counts = fine_hist[..., 0, :nf]

    def keys_in_sub_bin(x):
        # NaN to 0: a compile-ahead dry run (``compile_ahead``) gets here with unset memory
        index = torch.nan_to_num(torch.floor(x), nan=0.0).clamp(0, nf - 1).to(torch.int64)
        return torch.gather(counts, -1, index[..., None]).squeeze(-1)

    few = (keys_in_sub_bin(sub_bins - 0.01) <= 2) & (keys_in_sub_bin(sub_bins + 0.01) <= 2)
    return few | bracket.single | bracket.empty


def newton_update(t: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sums: torch.Tensor, spec: EntmaxSpec):
    """One safeguarded Newton step on ``g(t) = ||(z - t)_+||_gamma - 1``, the gamma-norm of the row's
    gaps above t: ``f(t) = sum (z - t)_+^gamma = 1`` has the same root tau, but g is convex and
    decreasing and close to linear (exactly linear while one key is above t), where f is a
    polynomial of degree gamma (100 at alpha 1.01). So a step from below never passes tau, one
    from above lands below it, and few steps reach it whatever alpha; and no power of a sum
    overflows as alpha -> 1. In terms of the sums: ``t + (1 - f^(-1/gamma)) f / f'`` with
    ``f' = sum (z - t)_+^(gamma - 1)`` (up to the factor gamma, which cancels).

    ``sums`` (B, H, Sq, 2) float: exact ``sum (z - t)_+^gamma`` and ``sum (z - t)_+^(gamma - 1)``.
    The bracket [lower, upper] keeps the iterate safe where a sum vanishes or rounding misleads.
    Returns (new t, new lower, new upper), float64.
    """
    f, df = sums.double().unbind(-1)
    t = t.double()
    below = f >= 1.0
    lower = torch.where(below, torch.maximum(lower, t), lower)
    upper = torch.where(below, upper, torch.minimum(upper, t))
    norm = f.clamp(min=1e-300) ** (1.0 / spec.gamma_at(f))
    newton = t + (1.0 - 1.0 / norm) * f / df.clamp(min=1e-300)
    # past the upper bound only by rounding (the bound is tau itself once a closed form found the
    # support): the bound is the better point; below the lower bound, bisect
    newton = torch.minimum(newton, upper)
    inside = (f > 0) & (df > 0) & (newton >= lower)
    return torch.where(inside, newton, 0.5 * (lower + upper)), lower, upper


class NewtonState(NamedTuple):
    """Per row (B, H, Sq) of the Newton schedule: the current point (float64, a lower bound of tau
    up to rounding), the bracket ``[lower, upper]`` of tau (float64) and ``done`` (bool: rows with
    no visible key, and rows that met a stopping rule of ``newton_step``)."""

    point: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    done: torch.Tensor

    @classmethod
    def of(cls, point, lower, upper, done) -> "NewtonState":
        """A state of copies (float64; ``done`` bool): the Triton backend's ``newton_step`` updates
        a state's tensors in place, so none may share memory with the caller's or with another."""
        return cls(*(x.to(torch.float64, copy=True) for x in (point, lower, upper)), done.to(torch.bool, copy=True))

    @classmethod
    def start(cls, reference: torch.Tensor, row_max: torch.Tensor) -> "NewtonState":
        """From the max pass: ``gap_reference`` (a lower bound of tau) and the row max (an upper
        bound); rows with no visible key start done."""
        return cls.of(reference, reference, row_max, ~torch.isfinite(row_max))


def column_tau(columns: torch.Tensor, spec: EntmaxSpec) -> torch.Tensor:
    """A lower bound of tau per row (in z, less ``FLOOR_MARGIN``) from its *column maxima*
    (..., BLOCK_N): the largest z of each key position of the key tiles a row sweeps, -inf where
    none. They are BLOCK_N distinct keys of the row, and the tau of any subset of a row's keys is
    at most its tau; on a flat row (thousands of keys within one of the max) their tau lies far
    above the max pass's bound, where most of those keys sit (``newton_schedule``'s start).
    ``COLUMN_STEPS`` Newton steps on the gamma-norm (``newton_update``'s) from their max - 1,
    where the sum is at least 1: from below every step stays below their tau. NaN or -inf on
    rows with no finite column or a NaN one."""
    top = columns.amax(-1)
    t = top - 1.0
    gamma = spec.gamma_at(t)
    for _ in range(COLUMN_STEPS):
        p, u = spec.power_and_slope((columns - t[..., None]).clamp(min=0))
        s0, s1 = p.sum(-1).clamp(min=1e-30), u.sum(-1)  # 0 only on rows with no column
        t = t + (1.0 - s0 ** (-1.0 / gamma)) * s0 / s1
    return t - FLOOR_MARGIN


def newton_step(state: NewtonState, sums: torch.Tensor, spec: EntmaxSpec, tolerance: float,
                step_tolerance: float, above: bool = False) -> NewtonState:
    """One step of the Newton schedule on the rows not done, from the merged sums of
    ``newton_moments_pass`` at ``t = state.point``: ``newton_update``, whose point stays below tau
    (up to rounding), and for alpha 1.5 an upper bound of tau from the same sums (when ``sums``
    holds the count: (..., 3); ``newton_sums_pass`` gives (..., 2)). A row is done
    once its step is at most ``step_tolerance``, or once the sum of p changes by at most
    ``tolerance`` between its point and the upper bound: their distance times the slope
    ``gamma f'`` at t, which bounds the slope beyond (keys only leave as t rises).

    Upper bound (gamma 2): the count n0, sum n1 and sum of squares n2 of the gaps above t fix
    ``Q(s) = sum_{z > t} (z - s)^2``, which is at least ``F(s) = sum (z - s)_+^2`` for s >= t (it
    keeps the keys that s passes); at its smaller root ``t + x`` with ``Q = 1``, ``F <= 1``: so
    tau <= t + x, with equality when no key lies between. The bound is taken only where the
    discriminant ``f'^2 - n0 (f - 1)`` keeps at least half of ``f'^2``: far below tau (f >> 1) the
    two nearly cancel, and the float32 rounding of the sums (the kernels' sums) would move the
    root below tau (by 3e-7 on flat rows of 2048 keys, whose p then summed to 1 - 2.3e-5).

    Exact stop (gamma 2, ``sums`` (..., 4), the fourth column the smallest gap ``z - t > 0``, +inf
    where none): where that gap exceeds ``x``, no key lies in (t, t + x], so the keys above
    ``t + x`` are the keys above t, on which ``t + x`` solves ``sum p = 1``: it is tau, and the row
    is done with it. Most rows stop so a pass before the tolerances stop them: the support has
    settled, but the Newton point still lies below tau.

    Exact stop from above (``above``: the fourth column is the smallest ``t - z >= 0``, the
    largest key at or below t; +inf where none): at a point above tau (f < 1) the same quadratic
    over the keys above t has its root ``t + x`` below t (x <= 0), and the keys above t are part
    of the support; where no key lies in (t + x, t], the keys above t + x are the keys above t,
    on which ``t + x`` solves ``sum p = 1``: it is tau. A root below ``state.lower`` is not."""
    f, df = sums[..., 0].double(), sums[..., 1].double()
    point, lower, upper = newton_update(state.point, state.lower, state.upper, sums[..., :2], spec)
    done = (point - state.point).abs() <= step_tolerance
    if spec.power == 2 and sums.shape[-1] >= 3:
        count = sums[..., 2].double()
        disc = df * df - count * (f - 1.0)
        x = (f - 1.0) / (df + disc.clamp(min=0).sqrt()).clamp(min=1e-300)
        valid = (f >= 1.0) & (2.0 * disc >= df * df) & (count > 0)
        upper = torch.where(valid, torch.minimum(upper, state.point + x), upper)
        done = done | ((upper - point) * spec.gamma * df <= tolerance)
        if sums.shape[-1] == 4:
            root, nearest = state.point + x, sums[..., 3].double()
            if above:
                exact = (f < 1.0) & (count > 0) & (-x < nearest) & (root >= state.lower)
            else:
                exact = valid & (x < nearest)
            point = torch.where(exact, root, point)
            done = done | exact
    keep = state.done
    return NewtonState(torch.where(keep, state.point, point), torch.where(keep, state.lower, lower),
                       torch.where(keep, state.upper, upper), keep | done)


def finalize_tau(tau: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """tau (float64), +inf on rows with no visible key."""
    return torch.where(empty, float("inf"), tau)
