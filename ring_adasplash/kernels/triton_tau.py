"""tau from the statistics, per row, for alpha 1.5 and 2: ``stats.coarse_bracket`` and
``stats.fine_tau`` as two small kernels (float64 inside, as the PyTorch versions).

The PyTorch versions run some forty float64 ops over (rows, bins) tensors: at 32K tokens and 16
heads that is 4-6 ms of launches and memory traffic, and at 8K most of the forward's time. Here
one program takes ``BLOCK_R`` rows and keeps every bin of them in registers. Notation as in
``stats.py``: bins of width ``w = 1 / (NUM_BINS - 1)``, ``K = floor(row max (NUM_BINS - 1))``,
``gamma = 1 / (alpha - 1)`` (1 for alpha 2, 2 for alpha 1.5), lengths in units of a bin (coarse)
or of the bin holding tau (fine).
"""
import triton
import triton.language as tl

from .triton_stats import ADD


@triton.jit
def _reference(Row_max, rows, in_rows, NUM_BINS: tl.constexpr):
    """K = floor(row max (NB - 1)) in float32 as ``stats.bin_reference`` (-1e9 on empty rows), as
    float64, and whether the row is empty."""
    row_max = tl.load(Row_max + rows, mask=in_rows, other=float("-inf"))
    empty = row_max == float("-inf")
    ref = tl.floor(tl.where(empty, 0.0, row_max) * (NUM_BINS - 1))
    return tl.where(empty, -1e9, ref).to(tl.float64), empty


@triton.jit
def _load_moments(Hist, rows, in_rows, NB: tl.constexpr):
    """count, sum u, sum u^2 (BLOCK_R, NB) float64 of a (rows, 3, NB) float32 histogram."""
    bins = tl.arange(0, NB)
    At = Hist + rows[:, None].to(tl.int64) * (3 * NB) + bins[None, :]
    count = tl.load(At, mask=in_rows[:, None], other=0.0).to(tl.float64)
    s1 = tl.load(At + NB, mask=in_rows[:, None], other=0.0).to(tl.float64)
    s2 = tl.load(At + 2 * NB, mask=in_rows[:, None], other=0.0).to(tl.float64)
    return count, s1, s2


@triton.jit
def _target(NUM_BINS: tl.constexpr, GAMMA: tl.constexpr):
    """sum_j p_j = 1 in bin-width units: (NB - 1)^gamma."""
    target = 1.0
    for _ in tl.static_range(GAMMA):
        target = target * (NUM_BINS - 1)
    return target


@triton.jit
def bracket_kernel(Row_max, Hist, Lower, Bin_index, Coarse_only, num_rows,
                   NUM_BINS: tl.constexpr, GAMMA: tl.constexpr, BLOCK_R: tl.constexpr):
    """Bin holding tau: the first local bin b whose lower edge has F_b = sum (x - edge_b)^gamma >= 1
    (in bin units: >= (NB - 1)^gamma), from prefix sums of the moments over the bins above it;
    and whether that bin holds at most one key (``stats.Bracket.coarse_only``)."""
    tl.static_assert(GAMMA == 1 or GAMMA == 2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < num_rows
    ref, empty = _reference(Row_max, rows, in_rows, NUM_BINS)
    count, s1, s2 = _load_moments(Hist, rows, in_rows, NUM_BINS)
    j = tl.arange(0, NUM_BINS).to(tl.float64)[None, :]
    # keys of bin i <= b sit (b - i) + u bin widths above the lower edge of bin b
    c_cum = tl.associative_scan(count, 1, ADD)
    m1 = tl.associative_scan(s1 - j * count, 1, ADD)
    if GAMMA == 1:
        edge = m1 + j * c_cum
    else:
        m2 = tl.associative_scan(s2 - 2.0 * j * s1 + j * j * count, 1, ADD)
        edge = m2 + 2.0 * j * m1 + j * j * c_cum
    target = _target(NUM_BINS, GAMMA)
    b_star = tl.minimum(tl.reduce((edge < target).to(tl.int32), 1, ADD), NUM_BINS - 1)
    bin_index = ref - b_star.to(tl.float64)
    count_at = tl.reduce(tl.where(j == b_star[:, None].to(tl.float64), count, 0.0), 1, ADD)
    tl.store(Coarse_only + rows, ((count_at <= 1.0) | empty).to(tl.int8), mask=in_rows)
    tl.store(Bin_index + rows, bin_index, mask=in_rows)
    tl.store(Lower + rows, (bin_index / (NUM_BINS - 1)).to(tl.float32), mask=in_rows)


@triton.jit
def _root(n0, n1, n2, target, GAMMA: tl.constexpr):
    """Smallest t with sum (x - t)^gamma = target over keys above t, from moments n0, n1, n2 of x."""
    if GAMMA == 1:
        root = (n1 - target) / tl.maximum(n0, 1e-30)
    else:
        disc = tl.maximum(n1 * n1 - n0 * (n2 - target), 0.0)
        root = (n2 - target) / tl.maximum(n1 + tl.sqrt(disc), 1e-30)
    return root


@triton.jit
def _f_at(t, m0, m1, m2, GAMMA: tl.constexpr):
    if GAMMA == 1:
        f = m1 - t * m0
    else:
        f = m2 - 2.0 * t * m1 + t * t * m0
    return f


@triton.jit
def fine_tau_kernel(Row_max, Hist, Bin_index, Fine, Tau, num_rows,
                    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, GAMMA: tl.constexpr, BLOCK_R: tl.constexpr):
    """tau from the coarse moments above the bin of tau and the fine histogram inside it: closed
    form on the exact sums above the sub-bin holding tau plus a two-point model of that sub-bin.
    Where the bin holds at most one key, its fine histogram comes from the coarse moments
    (``stats.single_key_fine``): the refinement pass may not have read that row."""
    tl.static_assert(GAMMA == 1 or GAMMA == 2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < num_rows
    ref, empty = _reference(Row_max, rows, in_rows, NUM_BINS)
    bin_index = tl.load(Bin_index + rows, mask=in_rows, other=0.0)
    count, s1, s2 = _load_moments(Hist, rows, in_rows, NUM_BINS)
    # keys of the coarse bins above the bin of tau: x = off + u above its lower edge
    b_star = (ref - bin_index)[:, None]
    j = tl.arange(0, NUM_BINS).to(tl.float64)[None, :]
    above = j < b_star
    off = tl.where(above, b_star - j, 0.0)
    a0 = tl.reduce(tl.where(above, count, 0.0), 1, ADD)
    a1 = tl.reduce(tl.where(above, s1 + off * count, 0.0), 1, ADD)
    a2 = tl.reduce(tl.where(above, s2 + 2.0 * off * s1 + off * off * count, 0.0), 1, ADD)

    fc, fv1, fv2 = _load_moments(Fine, rows, in_rows, FINE_BINS)
    s = tl.arange(0, FINE_BINS).to(tl.float64)[None, :]
    at_bin = j == b_star
    count_at = tl.reduce(tl.where(at_bin, count, 0.0), 1, ADD)
    coarse_only = (count_at <= 1.0) | empty
    # the one key's position in float32, as the refinement pass computes it
    frac = (tl.reduce(tl.where(at_bin, s1, 0.0), 1, ADD).to(tl.float32) * FINE_BINS)
    sub = tl.minimum(tl.maximum(tl.floor(frac), 0.0), FINE_BINS - 1)
    v = (frac - sub).to(tl.float64)
    one = tl.where(s == sub[:, None].to(tl.float64), tl.minimum(count_at, 1.0)[:, None], 0.0)
    fc = tl.where(coarse_only[:, None], one, fc)
    fv1 = tl.where(coarse_only[:, None], one * v[:, None], fv1)
    fv2 = tl.where(coarse_only[:, None], one * (v * v)[:, None], fv2)
    x1 = (fc * s + fv1) / FINE_BINS  # sum of x over sub-bin s
    x2 = (fc * s * s + 2.0 * s * fv1 + fv2) / (FINE_BINS * FINE_BINS)
    # moments of the keys in sub-bins >= s, plus every key above the bin
    n0 = a0[:, None] + tl.associative_scan(fc, 1, ADD, reverse=True)
    n1 = a1[:, None] + tl.associative_scan(x1, 1, ADD, reverse=True)
    n2 = a2[:, None] + tl.associative_scan(x2, 1, ADD, reverse=True)
    edge = s / FINE_BINS
    target = _target(NUM_BINS, GAMMA)
    f_edge = _f_at(edge, n0, n1, n2, GAMMA)
    s_star = tl.reduce((f_edge >= target).to(tl.int32), 1, ADD) - 1  # last sub-edge with F >= target
    s_star = tl.minimum(tl.maximum(s_star, 0), FINE_BINS - 1)
    at_star = s == s_star[:, None].to(tl.float64)
    at_next = s == (s_star + 1)[:, None].to(tl.float64)
    has_next = s_star + 1 < FINE_BINS
    # keys strictly above sub-bin s_star
    h0 = tl.where(has_next, tl.reduce(tl.where(at_next, n0, 0.0), 1, ADD), a0)
    h1 = tl.where(has_next, tl.reduce(tl.where(at_next, n1, 0.0), 1, ADD), a1)
    h2 = tl.where(has_next, tl.reduce(tl.where(at_next, n2, 0.0), 1, ADD), a2)
    c = tl.reduce(tl.where(at_star, fc, 0.0), 1, ADD)
    lo_edge = s_star.to(tl.float64) / FINE_BINS
    hi_edge = lo_edge + 1.0 / FINE_BINS
    mean = tl.where(c > 0, tl.reduce(tl.where(at_star, x1, 0.0), 1, ADD) / tl.maximum(c, 1.0), lo_edge)
    second = tl.reduce(tl.where(at_star, x2, 0.0), 1, ADD) / tl.maximum(c, 1.0)
    var = tl.maximum(tl.where(c > 0, second - mean * mean, 0.0), 0.0)
    spread = tl.sqrt(var)
    p1 = tl.minimum(tl.maximum(mean - spread, lo_edge), hi_edge)
    p2 = tl.minimum(tl.maximum(mean + spread, lo_edge), hi_edge)
    half = 0.5 * c
    # the sub-bin's keys as two points of half the count each: both above t, the upper one, none
    root_both = _root(h0 + c, h1 + half * (p1 + p2), h2 + half * (p1 * p1 + p2 * p2), target, GAMMA)
    root_upper = _root(h0 + half, h1 + half * p2, h2 + half * p2 * p2, target, GAMMA)
    root_none = _root(h0, h1, h2, target, GAMMA)
    f_p1 = _f_at(p1, h0 + half, h1 + half * p2, h2 + half * p2 * p2, GAMMA)
    f_p2 = _f_at(p2, h0, h1, h2, GAMMA)
    tau_rel = tl.where(f_p1 <= target, root_both, tl.where(f_p2 <= target, root_upper, root_none))
    tau_rel = tl.minimum(tl.maximum(tau_rel, lo_edge), hi_edge)
    tau = ((bin_index + tau_rel) / (NUM_BINS - 1)).to(tl.float32)
    tl.store(Tau + rows, tl.where(empty, float("inf"), tau), mask=in_rows)
