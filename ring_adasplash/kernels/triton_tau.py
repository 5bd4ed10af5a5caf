"""tau from the statistics, per row, for alpha 1.5 and 2: ``stats.coarse_bracket`` and
``stats.fine_tau`` as two small kernels (float64 inside, as the PyTorch versions).

The PyTorch versions run some forty float64 ops over (rows, bins) tensors: at 32K tokens and 16
heads that is 4-6 ms of launches and memory traffic, and at 8K most of the forward's time. Here
one program takes ``BLOCK_R`` rows and keeps every bin of them in registers. Notation as in
``stats.py``: bins of width ``w = 1 / (NUM_BINS - 1)``, ``K = floor(row max (NUM_BINS - 1))``,
``gamma = 1 / (alpha - 1)`` (1 for alpha 2, 2 for alpha 1.5), lengths in units of a coarse bin.
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
def _load_moments(Hist, rows, in_rows, NB: tl.constexpr, STRIDE: tl.constexpr):
    """The first NB columns (BLOCK_R, NB) float64 of the three moments of a (rows, 3, STRIDE)
    float32 histogram."""
    bins = tl.arange(0, NB)
    At = Hist + rows[:, None].to(tl.int64) * (3 * STRIDE) + bins[None, :]
    count = tl.load(At, mask=in_rows[:, None], other=0.0).to(tl.float64)
    s1 = tl.load(At + STRIDE, mask=in_rows[:, None], other=0.0).to(tl.float64)
    s2 = tl.load(At + 2 * STRIDE, mask=in_rows[:, None], other=0.0).to(tl.float64)
    return count, s1, s2


@triton.jit
def _target(NUM_BINS: tl.constexpr, GAMMA: tl.constexpr):
    """sum_j p_j = 1 in bin-width units: (NB - 1)^gamma."""
    target = 1.0
    for _ in tl.static_range(GAMMA):
        target = target * (NUM_BINS - 1)
    return target


@triton.jit
def bracket_kernel(Row_max, Hist, Lower, Bin_index, Single, num_rows,
                   NUM_BINS: tl.constexpr, GAMMA: tl.constexpr, BLOCK_R: tl.constexpr):
    """The pair of bins holding tau (``stats.coarse_bracket``): b_a, the first local bin whose
    upper bound ``U_b = sum_{j <= b} count_j (b - j + 1)^gamma`` of the edge sum reaches 1 (in bin
    units: (NB - 1)^gamma); tau lies in local bin b_a or b_a + 1. Rows with one key at or above
    the pair have tau = row max - 1 (``Bracket.single``), stored as their lower bound."""
    tl.static_assert(GAMMA == 1 or GAMMA == 2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < num_rows
    ref, empty = _reference(Row_max, rows, in_rows, NUM_BINS)
    j = tl.arange(0, NUM_BINS)
    count = tl.load(Hist + rows[:, None].to(tl.int64) * NUM_BINS + j[None, :], mask=in_rows[:, None],
                    other=0.0).to(tl.float64)
    j = j.to(tl.float64)[None, :]
    reach = j + 1.0
    c_cum = tl.associative_scan(count, 1, ADD)
    m1 = tl.associative_scan(j * count, 1, ADD)
    if GAMMA == 1:
        upper = reach * c_cum - m1
    else:
        m2 = tl.associative_scan(j * j * count, 1, ADD)
        upper = reach * reach * c_cum - 2.0 * reach * m1 + m2
    target = _target(NUM_BINS, GAMMA)
    b_a = tl.minimum(tl.reduce((upper < target).to(tl.int32), 1, ADD), NUM_BINS - 1)
    bin_index = ref - b_a.to(tl.float64) - 1.0
    keys_from_pair = tl.reduce(tl.where(j <= tl.minimum(b_a + 1, NUM_BINS - 1)[:, None].to(tl.float64), count, 0.0),
                               1, ADD)
    single = (keys_from_pair == 1.0) & ~empty
    row_max = tl.load(Row_max + rows, mask=in_rows, other=0.0)
    lower = tl.where(single, (row_max.to(tl.float64) - 1.0).to(tl.float32),
                     (bin_index / (NUM_BINS - 1)).to(tl.float32))
    tl.store(Bin_index + rows, bin_index, mask=in_rows)
    tl.store(Lower + rows, lower, mask=in_rows)
    tl.store(Single + rows, (single | empty).to(tl.int8), mask=in_rows)


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
def fine_tau_kernel(Bin_index, Empty, Single, Lower, Fine, Tau, num_rows,
                    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, GAMMA: tl.constexpr, BLOCK_R: tl.constexpr):
    """tau from the refinement sums (``stats.fine_tau``): closed form on the exact sums above the
    sub-bin holding tau plus a two-point model of that sub-bin. Lengths in coarse bins above the
    lower edge of the pair; sub-bins of width h = 2 / FINE_BINS. The sum at the pair's middle edge
    first says which of the two bins holds tau, so the scans run over that bin's sub-bins only
    (a scan over all FINE_BINS, in float64, took four times as long). ``Single`` rows take their
    tau from ``Lower`` (``stats.Bracket.single``): the refinement pass may not have read them."""
    tl.static_assert(GAMMA == 1 or GAMMA == 2)
    HALF: tl.constexpr = FINE_BINS // 2
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < num_rows
    empty = tl.load(Empty + rows, mask=in_rows, other=1) != 0
    bin_index = tl.load(Bin_index + rows, mask=in_rows, other=0.0)
    # keys above the pair: x = 2 + y
    Above = Fine + rows.to(tl.int64) * (3 * (FINE_BINS + 1)) + FINE_BINS
    a0 = tl.load(Above, mask=in_rows, other=0.0).to(tl.float64)
    y1 = tl.load(Above + (FINE_BINS + 1), mask=in_rows, other=0.0).to(tl.float64)
    y2 = tl.load(Above + 2 * (FINE_BINS + 1), mask=in_rows, other=0.0).to(tl.float64)
    a1 = 2.0 * a0 + y1
    a2 = 4.0 * a0 + 4.0 * y1 + y2

    h = 2.0 / FINE_BINS
    s = tl.arange(0, HALF).to(tl.float64)[None, :]
    fc_lo, fv1_lo, fv2_lo = _load_moments(Fine, rows, in_rows, HALF, FINE_BINS + 1)
    fc_up, fv1_up, fv2_up = _load_moments(Fine + HALF, rows, in_rows, HALF, FINE_BINS + 1)
    x1_lo = (fc_lo * s + fv1_lo) * h  # sum of x over sub-bin s of the lower bin
    x2_lo = (fc_lo * s * s + 2.0 * s * fv1_lo + fv2_lo) * (h * h)
    s_up = s + HALF
    x1_up = (fc_up * s_up + fv1_up) * h
    x2_up = (fc_up * s_up * s_up + 2.0 * s_up * fv1_up + fv2_up) * (h * h)
    target = _target(NUM_BINS, GAMMA)
    up0 = a0 + tl.reduce(fc_up, 1, ADD)
    up1 = a1 + tl.reduce(x1_up, 1, ADD)
    up2 = a2 + tl.reduce(x2_up, 1, ADD)
    in_upper = _f_at(1.0, up0, up1, up2, GAMMA) >= target  # tau at or above the middle edge
    # the bin holding tau, and the moments of every key above it
    fc = tl.where(in_upper[:, None], fc_up, fc_lo)
    x1 = tl.where(in_upper[:, None], x1_up, x1_lo)
    x2 = tl.where(in_upper[:, None], x2_up, x2_lo)
    b0 = tl.where(in_upper, a0, up0)
    b1 = tl.where(in_upper, a1, up1)
    b2 = tl.where(in_upper, a2, up2)
    first = tl.where(in_upper, HALF, 0)  # its first sub-bin
    n0 = b0[:, None] + tl.associative_scan(fc, 1, ADD, reverse=True)
    n1 = b1[:, None] + tl.associative_scan(x1, 1, ADD, reverse=True)
    n2 = b2[:, None] + tl.associative_scan(x2, 1, ADD, reverse=True)
    edge = (s + first[:, None].to(tl.float64)) * h
    f_edge = _f_at(edge, n0, n1, n2, GAMMA)
    s_star = tl.reduce((f_edge >= target).to(tl.int32), 1, ADD) - 1  # last sub-edge with F >= target
    s_star = tl.minimum(tl.maximum(s_star, 0), HALF - 1)
    at_star = s == s_star[:, None].to(tl.float64)
    at_next = s == (s_star + 1)[:, None].to(tl.float64)
    has_next = s_star + 1 < HALF
    # keys strictly above sub-bin s_star
    h0 = tl.where(has_next, tl.reduce(tl.where(at_next, n0, 0.0), 1, ADD), b0)
    h1 = tl.where(has_next, tl.reduce(tl.where(at_next, n1, 0.0), 1, ADD), b1)
    h2 = tl.where(has_next, tl.reduce(tl.where(at_next, n2, 0.0), 1, ADD), b2)
    c = tl.reduce(tl.where(at_star, fc, 0.0), 1, ADD)
    lo_edge = (s_star + first).to(tl.float64) * h
    hi_edge = lo_edge + h
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
    single = tl.load(Single + rows, mask=in_rows, other=0) != 0
    tau = tl.where(single, tl.load(Lower + rows, mask=in_rows, other=0.0), tau)
    tl.store(Tau + rows, tl.where(empty, float("inf"), tau), mask=in_rows)
