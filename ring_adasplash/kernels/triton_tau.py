"""tau from the statistics, per row, for alpha 1.5 and 2: ``stats.coarse_bracket`` and
``stats.fine_tau`` as two small kernels (float64 inside, as the PyTorch versions).

One program takes ``BLOCK_R`` rows and keeps every bin of them in registers, in place of some
forty float64 PyTorch ops over (rows, bins) tensors (why: docs/design.md (kernel choices)).
Notation as in ``stats.py``: bins of width ``w = 1 / (NUM_BINS - 1)``, ``K = floor(row max
(NUM_BINS - 1))``, ``POWER`` = gamma = ``1 / (alpha - 1)`` (1 for alpha 2, 2 for alpha 1.5,
``EntmaxSpec.power``), lengths in units of a coarse bin.
"""
import triton
import triton.language as tl

from .triton_common import ADD


@triton.jit
def _reference(Row_max, rows, in_rows, NUM_BINS: tl.constexpr):
    """K = floor(row max (NB - 1)) in float32 as ``stats.bin_reference`` (-1e9 on empty rows), as
    float64, and whether the row is empty."""
    row_max = tl.load(Row_max + rows, mask=in_rows, other=float("-inf"))
    empty = row_max == float("-inf")
    ref = tl.floor(tl.where(empty, 0.0, row_max) * (NUM_BINS - 1))
    return tl.where(empty, -1e9, ref).to(tl.float64), empty


@triton.jit
def _target(NUM_BINS: tl.constexpr, POWER: tl.constexpr):
    """sum_j p_j = 1 in bin-width units: (NB - 1)^gamma."""
    target = 1.0
    for _ in tl.static_range(POWER):
        target = target * (NUM_BINS - 1)
    return target


@triton.jit
def bracket_kernel(Row_max, Hist, Lower, Bin_index, Single, num_rows,
                   NUM_BINS: tl.constexpr, POWER: tl.constexpr, BLOCK_R: tl.constexpr):
    """The pair of bins holding tau (``stats.coarse_bracket``): b_a, the first local bin whose
    upper bound ``U_b = sum_{j <= b} count_j (b - j + 1)^gamma`` of the edge sum reaches 1 (in bin
    units: (NB - 1)^gamma); tau lies in local bin b_a or b_a + 1. Rows with one key at or above
    the pair have tau = row max - 1 (``Bracket.single``), stored as their lower bound."""
    tl.static_assert(POWER == 1 or POWER == 2)
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
    if POWER == 1:
        upper = reach * c_cum - m1
    else:
        m2 = tl.associative_scan(j * j * count, 1, ADD)
        upper = reach * reach * c_cum - 2.0 * reach * m1 + m2
    target = _target(NUM_BINS, POWER)
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
def _root(n0, n1, n2, target, POWER: tl.constexpr):
    """Smallest t with sum (x - t)^gamma = target over keys above t, from moments n0, n1, n2 of x."""
    if POWER == 1:
        root = (n1 - target) / tl.maximum(n0, 1e-30)
    else:
        disc = tl.maximum(n1 * n1 - n0 * (n2 - target), 0.0)
        root = (n2 - target) / tl.maximum(n1 + tl.sqrt(disc), 1e-30)
    return root


@triton.jit
def _f_at(t, m0, m1, m2, POWER: tl.constexpr):
    if POWER == 1:
        f = m1 - t * m0
    else:
        f = m2 - 2.0 * t * m1 + t * t * m0
    return f


@triton.jit
def fine_tau_kernel(Bin_index, Empty, Single, Lower, Fine, Tau, Exact, num_rows,
                    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, POWER: tl.constexpr, BLOCK_R: tl.constexpr):
    """tau from the fine histogram sums (``stats.fine_tau``): closed form on the exact sums above the
    sub-bin holding tau plus a two-point model of that sub-bin. Lengths in coarse bins above the
    lower edge of the pair; sub-bins of width h = 2 / FINE_BINS.

    One thread per row walks the sub-bins from the top down, adding each to the moments of the
    keys above it, and stops taking values at the first sub-edge where ``sum (x - t)^gamma``
    reaches the target: that is the last such edge (the sum falls as t rises), as in
    ``stats.fine_tau``. Nothing crosses threads (why: docs/design.md (kernel choices)).
    ``Single`` rows take their tau from ``Lower`` (``stats.Bracket.single``) and read nothing:
    the fine histogram pass may not have read them. ``Exact`` (int8): the rows whose tau is exact
    (``stats.two_point_exact``)."""
    tl.static_assert(POWER == 1 or POWER == 2)
    ROW_SIZE: tl.constexpr = 3 * (FINE_BINS + 1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < num_rows
    empty = tl.load(Empty + rows, mask=in_rows, other=1) != 0
    single = tl.load(Single + rows, mask=in_rows, other=0) != 0
    solved = in_rows & ~empty & ~single  # the rest read nothing more (at high sparsity, most rows)
    bin_index = tl.load(Bin_index + rows, mask=solved, other=0.0)
    Count = Fine + rows.to(tl.int64) * ROW_SIZE  # (rows, 3, FINE_BINS + 1): count, sum v, sum v^2
    # keys above the pair: x = 2 + y
    a0 = tl.load(Count + FINE_BINS, mask=solved, other=0.0).to(tl.float64)
    y1 = tl.load(Count + (FINE_BINS + 1) + FINE_BINS, mask=solved, other=0.0).to(tl.float64)
    y2 = tl.load(Count + 2 * (FINE_BINS + 1) + FINE_BINS, mask=solved, other=0.0).to(tl.float64)
    n0 = a0  # moments (count, sum x, sum x^2) of the keys above the current sub-edge
    n1 = 2.0 * a0 + y1
    n2 = 4.0 * a0 + 4.0 * y1 + y2
    target = _target(NUM_BINS, POWER)
    h = 2.0 / FINE_BINS
    found = rows < 0
    zero = tl.full([BLOCK_R], 0.0, tl.float64)
    h0, h1, h2, c, c1, c2 = zero, zero, zero, zero, zero, zero  # above s_star; sub-bin s_star
    s_star = tl.full([BLOCK_R], 0, tl.int32)
    for i in range(0, FINE_BINS):
        s = FINE_BINS - 1 - i
        fc = tl.load(Count + s, mask=solved, other=0.0).to(tl.float64)
        fv1 = tl.load(Count + (FINE_BINS + 1) + s, mask=solved, other=0.0).to(tl.float64)
        fv2 = tl.load(Count + 2 * (FINE_BINS + 1) + s, mask=solved, other=0.0).to(tl.float64)
        sf = s * 1.0
        x1 = (fc * sf + fv1) * h  # sum of x over sub-bin s
        x2 = (fc * sf * sf + 2.0 * sf * fv1 + fv2) * (h * h)
        m0 = n0 + fc
        m1 = n1 + x1
        m2 = n2 + x2
        # sub-edge s is the last with F >= target, or s = 0 where none is (stats.fine_tau's clamp)
        take = ~found & ((_f_at(sf * h, m0, m1, m2, POWER) >= target) | (s == 0))
        h0 = tl.where(take, n0, h0)
        h1 = tl.where(take, n1, h1)
        h2 = tl.where(take, n2, h2)
        c = tl.where(take, fc, c)
        c1 = tl.where(take, x1, c1)
        c2 = tl.where(take, x2, c2)
        s_star = tl.where(take, s, s_star)
        found = found | take
        n0, n1, n2 = m0, m1, m2
    lo_edge = s_star.to(tl.float64) * h
    hi_edge = lo_edge + h
    mean = tl.where(c > 0, c1 / tl.maximum(c, 1.0), lo_edge)
    second = c2 / tl.maximum(c, 1.0)
    var = tl.maximum(tl.where(c > 0, second - mean * mean, 0.0), 0.0)
    spread = tl.sqrt(var)
    p1 = tl.minimum(tl.maximum(mean - spread, lo_edge), hi_edge)
    p2 = tl.minimum(tl.maximum(mean + spread, lo_edge), hi_edge)
    half = 0.5 * c
    # the sub-bin's keys as two points of half the count each: both above t, the upper one, none
    root_both = _root(h0 + c, h1 + half * (p1 + p2), h2 + half * (p1 * p1 + p2 * p2), target, POWER)
    root_upper = _root(h0 + half, h1 + half * p2, h2 + half * p2 * p2, target, POWER)
    root_none = _root(h0, h1, h2, target, POWER)
    f_p1 = _f_at(p1, h0 + half, h1 + half * p2, h2 + half * p2 * p2, POWER)
    f_p2 = _f_at(p2, h0, h1, h2, POWER)
    tau_rel = tl.where(f_p1 <= target, root_both, tl.where(f_p2 <= target, root_upper, root_none))
    tau_rel = tl.minimum(tl.maximum(tau_rel, lo_edge), hi_edge)
    tau = ((bin_index + tau_rel) / (NUM_BINS - 1)).to(tl.float32)
    tau = tl.where(single, tl.load(Lower + rows, mask=in_rows, other=0.0), tau)
    tl.store(Tau + rows, tl.where(empty, float("inf"), tau), mask=in_rows)
    # stats.two_point_exact on the stored tau: at most two keys in its sub-bin, looked up a
    # hundredth of a sub-bin on either side
    sub_bins = (tau.to(tl.float64) * (NUM_BINS - 1) - bin_index) * (FINE_BINS / 2)
    sub_bins = tl.where(solved & (sub_bins == sub_bins), sub_bins, 0.0)  # NaN: a compile-ahead dry run
    few = solved
    for SIDE in tl.static_range(2):
        index = tl.minimum(tl.maximum(tl.floor(sub_bins + (0.01 if SIDE == 1 else -0.01)), 0.0), FINE_BINS - 1.0)
        few = few & (tl.load(Count + index.to(tl.int32), mask=solved, other=0.0) <= 2.0)
    tl.store(Exact + rows, (few | ~solved).to(tl.int8), mask=in_rows)


@triton.jit
def one_minus_root(f, gamma, POWER: tl.constexpr):
    """``1 - f^(-1 / gamma)`` (float64) without the cancellation of ``f`` near 1, where the last
    Newton steps are: the step's size is this times ``f / f'``."""
    if POWER == 2:
        root = tl.sqrt(f)
        value = (f - 1.0) / (root * (root + 1.0))
    elif POWER == 1:
        value = (f - 1.0) / f
    else:
        y = tl.log(f) / gamma  # 1 - exp(-y), a series where y is small
        value = tl.where(tl.abs(y) < 1e-3, y * (1.0 - y * (0.5 - y * (1.0 / 6.0 - y / 24.0))), 1.0 - tl.exp(-y))
    return value


@triton.jit
def newton_row_step(f, df, count, closest, t, lower, upper, gamma, tolerance, step_tolerance, POWER: tl.constexpr,
                    EXACT_STOP: tl.constexpr, EXACT_ABOVE: tl.constexpr = False):
    """``stats.newton_step`` on rows in registers (float64): from the sums ``f``, ``df`` and
    ``count`` at ``t`` and the bracket ``[lower, upper]``, the next ``(point, lower, upper, done)``;
    with ``EXACT_STOP`` (and ``POWER`` 2), ``closest`` (the smallest gap above t) stops the rows
    whose closed form is exact; with ``EXACT_ABOVE`` instead, ``closest`` is the smallest
    ``t - z >= 0`` and the rows above tau whose closed form is exact stop (``stats.newton_step``'s
    ``above``)."""
    lower_at_t = lower
    below = f >= 1.0
    lower = tl.where(below, tl.maximum(lower, t), lower)
    upper = tl.where(below, upper, tl.minimum(upper, t))
    newton = t + one_minus_root(tl.maximum(f, 1e-300), gamma, POWER) * f / tl.maximum(df, 1e-300)
    newton = tl.minimum(newton, upper)  # past the upper bound only by rounding (stats.newton_update)
    inside = (f > 0) & (df > 0) & (newton >= lower)
    point = tl.where(inside, newton, 0.5 * (lower + upper))
    done = tl.abs(point - t) <= step_tolerance
    if POWER == 2:  # the upper bound (stats.newton_step)
        disc = df * df - count * (f - 1.0)
        x = (f - 1.0) / tl.maximum(df + tl.sqrt(tl.maximum(disc, 0.0)), 1e-300)
        # only where the discriminant keeps at least half of df^2 (stats.newton_step)
        valid = below & (2.0 * disc >= df * df) & (count > 0)
        upper = tl.where(valid, tl.minimum(upper, t + x), upper)
        done = done | ((upper - point) * gamma * df <= tolerance)
        if EXACT_STOP or EXACT_ABOVE:
            if EXACT_ABOVE:  # above tau, no key in (t + x, t]: t + x is tau (stats.newton_step, above)
                exact = (f < 1.0) & (count > 0) & (-x < closest) & (t + x >= lower_at_t)
            else:  # no key in (t, t + x]: t + x is tau (stats.newton_step)
                exact = valid & (x < closest)
            point = tl.where(exact, t + x, point)
            done = done | exact
    return point, lower, upper, done


@triton.jit
def schedule_rows(Shift, Row_max, Reference, rows, in_q):
    """The Newton schedule's start on the rows ``rows`` (``stats.NewtonState.start``): their shift,
    relative row max (float32), ``Reference`` and which are done from the start (no visible key,
    a score that is not finite, or past the sequence): ``(shift, row_max, reference, done)``."""
    shift = tl.load(Shift + rows, mask=in_q, other=0.0)
    row_max = tl.load(Row_max + rows, mask=in_q, other=float("inf"))
    reference = tl.load(Reference + rows, mask=in_q, other=0.0)
    done = ~((row_max == row_max) & (tl.abs(row_max) < float("inf"))) | ~in_q
    return shift, row_max, reference, done


@triton.jit
def newton_live_rows_step(f, df, count, closest, t, point, lower, upper, done, step, gamma, tolerance, step_tolerance,
                          POWER: tl.constexpr, EXACT_STOP: tl.constexpr, EXACT_ABOVE: tl.constexpr = False):
    """One step of a kernel's Newton loop on rows in registers: ``newton_row_step`` from the sums at
    ``t`` on the rows not ``done``; returns ``(point, lower, upper, done, step + 1, live)``, live the
    number of rows not done."""
    next_point, next_lower, next_upper, converged = newton_row_step(f, df, count, closest, t.to(tl.float64), lower,
                                                                    upper, gamma, tolerance, step_tolerance, POWER,
                                                                    EXACT_STOP, EXACT_ABOVE)
    point = tl.where(done, point, next_point)
    lower = tl.where(done, lower, next_lower)
    upper = tl.where(done, upper, next_upper)
    done = done | converged
    return point, lower, upper, done, step + 1, tl.reduce((~done).to(tl.int32), 0, ADD)


@triton.jit
def newton_step_kernel(Sums, Point, Lower, Upper, Done, num_rows, seqlen_q, num_heads, gamma, tolerance,
                       step_tolerance, POWER: tl.constexpr, SUMS: tl.constexpr, BLOCK_R: tl.constexpr,
                       PER_HEAD: tl.constexpr):
    """``stats.newton_step`` in place on the rows not done: ``Sums`` (rows, SUMS) float64, the exact
    ``sum (z - t)_+^gamma``, ``sum (z - t)_+^(gamma - 1)`` and (SUMS 3) the count of keys above
    ``t = Point`` (float64), the bracket ``Lower``, ``Upper`` (float64) and ``Done`` (int8), rows
    (B, H, Sq) flat (``gamma`` per head with ``PER_HEAD``: ``of_query_head``). With SUMS 2 (no
    count) the upper bound of gamma 2 is not taken."""
    tl.static_assert(SUMS == 2 or SUMS == 3)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = (rows < num_rows) & (tl.load(Done + rows, mask=rows < num_rows, other=1) == 0)
    if PER_HEAD:
        gamma = tl.load(gamma + (rows // seqlen_q) % num_heads, mask=rows < num_rows, other=1.0)
    f = tl.load(Sums + rows * SUMS, mask=live, other=0.0)
    df = tl.load(Sums + rows * SUMS + 1, mask=live, other=0.0)
    count = tl.load(Sums + rows * SUMS + 2, mask=live & (SUMS == 3), other=0.0)
    t = tl.load(Point + rows, mask=live, other=0.0)
    lower = tl.load(Lower + rows, mask=live, other=0.0)
    upper = tl.load(Upper + rows, mask=live, other=0.0)
    point, lower, upper, done = newton_row_step(f, df, count, f, t, lower, upper, gamma, tolerance, step_tolerance,
                                                POWER, False)
    tl.store(Point + rows, point, mask=live)
    tl.store(Lower + rows, lower, mask=live)
    tl.store(Upper + rows, upper, mask=live)
    tl.store(Done + rows, done.to(tl.int8), mask=live)
