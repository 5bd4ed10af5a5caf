"""The Newton schedule, and the exact finish after the closed form, in one launch each, for a
query block that holds all its keys (one device).

``newton_schedule_kernel`` (``torch_blockwise.newton_schedule``): one program per (query tile,
batch x query head) loads its queries once and runs every step of ``algorithm``'s Newton
schedule on them: a sweep of its listed key tiles summing ``(z - t)_+^gamma``, ``(z -
t)_+^(gamma - 1)`` and the count of keys above t at its rows' points, then
``triton_tau.newton_row_step`` on its rows in registers (float64), until every row is done or
``MAX_STEPS``. Where rows converge at different speeds, each query tile stops on its own, and
nothing goes back to the host between steps (a launch, the tile lists and a few small ops per step
cost more than the sweep itself where few tiles are active). Each row starts from the larger of
``Reference`` and its *column floor* (``column_floor``: the tau of the largest score of each key
position over the listed tiles, one sweep of maxima before the first step): on flat rows it saves
two or three sweeps (docs/design.md, the Newton schedule).

From step ``NARROW_STEP`` on, each sweep records in ``Keep[tile]`` whether a key of the tile lies
above ``point - margin`` (the tiles that may hold p > 0 for any tau at or above the point): every
row with such a key stores 1 + the step itself, with no reduction across the program's warps
(which would hold them all at a barrier on every tile), and at the end the tiles of the last
sweep become 1, the others 0. A query tile whose rows were all done before that step keeps 1 on
its listed tiles. The marks' row reduction is an integer min over the bits of ``z - t``, which
also gives each row's smallest gap above its point: at gamma 2, where that gap exceeds the
distance to the closed form on the keys above the point, the row is done with it, exactly
(``stats.newton_step``), often a sweep before the tolerances would stop it, and at no cost
beyond the marks. A sweep reads every listed tile, in two loops with no branch inside
(``list_slots``): the loads of the next tiles are issued while this one is computed (a sweep
that skipped the tiles below every row's lower bound, as the pass-by-pass schedule does once,
saved little: on attention rows few tiles lie between the max pass's bound and tau).

``newton_polish_kernel`` runs the histogram schedule's exact finish (``stats.POLISH_STEPS`` steps
after the closed form, on the few rows it leaves inexact) the same way, in one launch: a query
tile with no such row reads nothing. Pass by pass it cost two sums launches and two step launches
on every call, though almost no row needs them.
"""
import triton
import triton.language as tl

from .triton_common import (ADD, MAX, copy_power, form_copies, list_slots, listed_query_tile, listed_scores, logits,
                            of_query_head, offset_strides, positive_gap, power_and_slope, program_query_tile,
                            row_offsets, runs_form, runs_here)
from .triton_refine import ONES_WIDTH, newton_tiles
from .triton_tau import newton_live_rows_step, schedule_rows


@triton.jit
def newton_sweep(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                 offs_m, Keep, tile_row, t, ones, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z, gamma,
                 margin, mark, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 POWER: tl.constexpr, COUNT: tl.constexpr, KEEP: tl.constexpr, UNROLL: tl.constexpr,
                 PRECISION: tl.constexpr, BELOW: tl.constexpr = False):
    """One sweep of the listed key tiles at ``t`` (float32 per row): ``(f, f', count, closest)`` per
    row, float64 (the count 0 without ``COUNT``), and with ``KEEP`` ``mark`` on the tiles that may
    hold p > 0 and ``closest`` the smallest gap ``z - t > 0`` (+inf where none, and without
    ``KEEP``); with ``BELOW`` instead, ``closest`` the smallest ``t - z >= 0`` (``newton_tiles``)."""
    f_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    df_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    above = tl.full([BLOCK_M, ONES_WIDTH], 0.0, tl.float32)
    closest = tl.full([BLOCK_M], 0xFFFFFFFF, tl.uint32)  # as float32 bits (newton_tiles)
    for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
        for FORM in tl.static_range(form_copies(POWER)):  # triton_common.runs_form
            if runs_form(gamma, FORM, POWER):
                f_sum, df_sum, above, closest = newton_tiles(
                    q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                    offs_m, Keep, tile_row, t, ones, f_sum, df_sum, above, closest, stride_ks, stride_kd, seqlen_q,
                    seqlen_k, shift, scale_z, gamma, margin, mark, HEAD_DIM, BLOCK_N,
                    copy_power(POWER, FORM), COUNT, KEEP, FULL == 1, UNROLL,
                    PRECISION, BELOW)
    # bits above +inf's: no positive gap (a negative float, or NaN on rows marked NaN whole)
    positive = closest <= 0x7F800000
    closest = tl.where(positive, closest.to(tl.float32, bitcast=True), float("inf"))
    return (f_sum.to(tl.float64), df_sum.to(tl.float64), tl.reduce(above, 1, MAX).to(tl.float64),
            closest.to(tl.float64))


@triton.jit
def column_floor(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                 offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z, gamma, reference, done,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POWER: tl.constexpr,
                 STEPS: tl.constexpr, MARGIN: tl.constexpr, PRECISION: tl.constexpr):
    """The schedule's start (``torch_blockwise.column_floor``): one sweep of the listed tiles
    keeping, per row and key position, the largest score (an elementwise max, no reduction), then
    ``STEPS`` Newton steps on the gamma-norm of those columns from their max - 1
    (``stats.column_tau``); the larger of that, less ``MARGIN``, and ``reference`` on the rows not
    ``done``, ``reference`` on the others."""
    columns = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
        start, stop = list_slots(count, full_first, full_end, FULL)
        for j in range(start, stop):
            _, _, s = listed_scores(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit,
                                    q_doc, q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, HEAD_DIM,
                                    BLOCK_N, FULL == 1, PRECISION)
            columns = tl.maximum(columns, s)
    # z of the largest score is the largest z: the shift and the scale keep the order
    z = logits(columns, shift[:, None], scale_z)
    t = tl.reduce(z, 1, MAX) - 1.0
    for _ in tl.static_range(STEPS):
        p, u = power_and_slope(positive_gap(z, t[:, None]), gamma, POWER)
        s0 = tl.maximum(tl.reduce(p, 1, ADD), 1e-30)  # 0 only on rows with no column
        s1 = tl.reduce(u, 1, ADD)
        t += (1.0 - tl.exp2(-tl.log2(s0) / gamma)) * s0 / s1
    t -= MARGIN
    return tl.where(~done & (t > reference), t, reference)  # NaN fails the comparison


@triton.jit
def newton_steps(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                 offs_m, Keep, tile_row, ones, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z, gamma, margin,
                 tolerance, step_tolerance, point, lower, upper, done, step, live, LAST: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, POWER: tl.constexpr,
                 COUNT: tl.constexpr, KEEP: tl.constexpr, UNROLL: tl.constexpr, PRECISION: tl.constexpr,
                 ABOVE: tl.constexpr = False):
    """Steps ``step``, ``step + 1``, ... up to ``LAST`` (excluded) while a row is live: a sweep at
    the rows' points (rounded to float32, as the sweep takes them), then ``newton_row_step`` on the
    rows not done (with ``COUNT`` the sweep counts the keys above each point, and at gamma 2 the
    step takes the upper bound they give; with ``KEEP`` it marks the tiles, and at gamma 2 the
    smallest gaps it finds with the marks stop the rows whose closed form is exact; with ``ABOVE``
    instead, at gamma 2, the largest keys at or below the points stop the rows above tau whose
    closed form is exact: ``stats.newton_step``'s ``above``). Returns ``(point, lower, upper, done,
    step, live)``."""
    while (step < LAST) & (live > 0):
        t = point.to(tl.float32)
        f, df, n, closest = newton_sweep(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end,
                                         q_limit, q_doc, q_first, offs_m, Keep, tile_row, t, ones, stride_ks,
                                         stride_kd, seqlen_q, seqlen_k, shift, scale_z, gamma, margin,
                                         (step + 1).to(tl.int8), HEAD_DIM, BLOCK_M, BLOCK_N, POWER, COUNT, KEEP,
                                         UNROLL, PRECISION, ABOVE)
        point, lower, upper, done, step, live = newton_live_rows_step(f, df, n, closest, t, point, lower, upper, done,
                                                                     step, gamma, tolerance, step_tolerance, POWER,
                                                                     KEEP, ABOVE)
    return point, lower, upper, done, step, live


@triton.jit
def newton_schedule_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Reference, Row_max, Tau, Keep, Spilled,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z, gamma, margin, tolerance, step_tolerance,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, MAX_STEPS: tl.constexpr, NARROW_STEP: tl.constexpr, UPPER_STEP: tl.constexpr,
    SPILLED_ONLY: tl.constexpr,
    COLUMN_STEPS: tl.constexpr, COLUMN_MARGIN: tl.constexpr, UNROLL: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """tau (float64, the last point; rows with no visible key keep their start) into ``Tau`` and
    ``Keep`` (int8 per tile); ``Reference`` (``stats.gap_reference``) and ``Row_max`` (float32,
    relative: 0, or not finite on rows with no visible key or a non-finite score) start the
    bracket, as ``stats.NewtonState.start``. With ``SPILLED_ONLY`` only the query tiles marked in
    ``Spilled`` (int8 per query tile) run (``triton_candidates``); the others store nothing. See the
    module doc."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(NARROW_STEP < MAX_STEPS)  # the second loop marks the tiles
    if runs_here(Spilled, SPILLED_ONLY):
        (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row,
         full_first, full_end) = listed_query_tile(
            Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
            stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
            GROUP, HEAD_DIM, BLOCK_M)
        scale_z_h = of_query_head(scale_z, h, PER_HEAD)  # a new name: the branch yields no pointer
        gamma_h = of_query_head(gamma, h, PER_HEAD)
        shift, row_max, reference, done = schedule_rows(Shift, Row_max, Reference, rows, in_q)
        start = column_floor(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc,
                             q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z_h, gamma_h,
                             reference, done, HEAD_DIM, BLOCK_M, BLOCK_N, POWER, COLUMN_STEPS, COLUMN_MARGIN,
                             PRECISION)
        point = start.to(tl.float64)
        lower = point
        upper = row_max.to(tl.float64)
        ones = tl.full([BLOCK_N, ONES_WIDTH], 1.0, q.dtype)
        live = tl.reduce((~done).to(tl.int32), 0, ADD)
        step = tl.full([], 0, tl.int32)  # a tensor, not the constant 0: the helper's loop reassigns it
        # the same steps in three loops: the first sweep; at gamma 2 the second at the upper bound
        # the first gave, finding the largest keys below the points (the exact stop from above); the
        # rest marking the tiles (and with the marks finding the smallest gaps: the exact stop, at
        # gamma 2): no branch inside a sweep
        tl.static_assert(UPPER_STEP < NARROW_STEP)
        first_upper = upper
        point, lower, upper, done, step, live = newton_steps(
            q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first, offs_m,
            Keep, tile_row, ones, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z_h, gamma_h, margin,
            tolerance, step_tolerance, point, lower, upper, done, step, live, UPPER_STEP, HEAD_DIM, BLOCK_M, BLOCK_N,
            POWER, POWER == 2, False, UNROLL, PRECISION)
        if POWER == 2:  # the next sweep at the upper bound the first gave, where it gave one
            point = tl.where(~done & (upper < first_upper), upper, point)
        point, lower, upper, done, step, live = newton_steps(
            q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first, offs_m,
            Keep, tile_row, ones, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z_h, gamma_h, margin,
            tolerance, step_tolerance, point, lower, upper, done, step, live, NARROW_STEP, HEAD_DIM, BLOCK_M, BLOCK_N,
            POWER, POWER == 2, False, UNROLL, PRECISION, POWER == 2)
        point, lower, upper, done, step, live = newton_steps(
            q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first, offs_m,
            Keep, tile_row, ones, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z_h, gamma_h, margin,
            tolerance, step_tolerance, point, lower, upper, done, step, live, MAX_STEPS, HEAD_DIM, BLOCK_M, BLOCK_N,
            POWER, POWER == 2, True, UNROLL, PRECISION)
        # Keep now holds, per tile, 1 + the last step whose sweep found a key of it near; the last
        # sweep's tiles become 1, the others 0; where no sweep marked, every listed tile is 1
        marked = step > NARROW_STEP
        for start in range(0, count, BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            in_list = slots < count
            At = Keep + tile_row + tl.load(Tile_index + slots, mask=in_list, other=0).to(tl.int32)
            last = tl.load(At, mask=in_list, other=0) == step
            tl.store(At, tl.where(last | ~marked, 1, 0).to(tl.int8), mask=in_list)
        tl.store(Tau + rows, point, mask=in_q)


@triton.jit
def newton_polish_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Point, Lower, Upper, Done,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z, gamma, no_stop,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, STEPS: tl.constexpr, UNROLL: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """``STEPS`` Newton steps on the rows not ``Done`` (int8), from ``Point`` in the bracket
    [``Lower``, ``Upper``] (float64; the last point into ``Point``), with sums without the count
    and tolerances ``no_stop`` (``stats.NO_STOP``: no row stops early): the exact finish after the
    closed form (``torch_blockwise.newton_polish``). Rarely is a row not done, so a query tile
    whose rows are all done reads nothing more, not even its queries."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q, bh, b, h, offs_m, in_q = program_query_tile(num_heads, seqlen_q, BLOCK_M)
    rows = row_offsets(bh, seqlen_q, offs_m)
    done = (tl.load(Done + rows, mask=in_q, other=1) != 0) | ~in_q
    live = tl.reduce((~done).to(tl.int32), 0, ADD)
    if live > 0:
        (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row,
         full_first, full_end) = listed_query_tile(
            Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
            stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
            GROUP, HEAD_DIM, BLOCK_M)
        scale_z_h = of_query_head(scale_z, h, PER_HEAD)  # a new name: the branch yields no pointer
        gamma_h = of_query_head(gamma, h, PER_HEAD)
        shift = tl.load(Shift + rows, mask=in_q, other=0.0)
        point = tl.load(Point + rows, mask=in_q, other=0.0)
        lower = tl.load(Lower + rows, mask=in_q, other=0.0)
        upper = tl.load(Upper + rows, mask=in_q, other=0.0)
        ones = tl.full([BLOCK_N, ONES_WIDTH], 1.0, q.dtype)
        step = tl.full([], 0, tl.int32)
        # no tile marks (KEEP off): Tile_count stands in for the Keep pointer, never written
        point, lower, upper, done, step, live = newton_steps(
            q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first, offs_m,
            Tile_count, tile_row, ones, stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z_h, gamma_h, 0.0,
            no_stop, no_stop, point, lower, upper, done, step, live, STEPS, HEAD_DIM, BLOCK_M, BLOCK_N, POWER, False,
            False, UNROLL, PRECISION)
        tl.store(Point + rows, point, mask=in_q)
