"""The refinement passes, over the listed key tiles of each query tile: the fine histogram near
tau (alpha 1.5 and 2) and the Newton sums (other alpha).

One program per (query tile, batch x query head); it visits only the key tiles listed for it
(``Tile_index[:Tile_count]``).

``fine_histogram_kernel`` (``torch_blockwise.fine_histogram_pass``): ``Bin_index`` = the lower of
the two coarse bins that hold tau (``stats.Bracket``): per row, FINE_BINS sub-bins of the pair
with count, sum v, sum v^2 (v the position inside the sub-bin) of its keys at or above
``Cutoff`` (keys below it have p = 0), and count, sum y, sum y^2 of the keys above the pair;
``Keep[tile]``: the tile has a key at or above ``Cutoff`` and no more than one bin below the
pair. The sub-bins are added into ``Sums`` (each program first zeroes its own rows; each row
belongs to one program, so nothing contends across programs) by ``add_moments_by_row``: one
distinct sub-bin of every row at a time, row sums, then 3 atomics per row. The sums above the
pair are row sums kept in registers and stored once (why: docs/design.md (kernel choices)).

``newton_sums_kernel`` (``torch_blockwise.newton_sums_pass``, ``newton_moments_pass``):
sum (z - t)_+^gamma and sum (z - t)_+^(gamma - 1) at t = ``Point``; for the Newton schedule also
the count of keys above t and per tile whether it may hold p > 0.
"""
import triton
import triton.language as tl

from .triton_common import (ADD, MAX, MIN, copy_power, dot, entmax_weights, form_copies, list_slots, listed_logits,
                            listed_query_tile, of_query_head, offset_strides, positive_gap, runs_form)

ONES_WIDTH = tl.constexpr(16)  # the narrowest product the tensor cores take (newton_sums_kernel)


@triton.jit
def add_moments_by_row(Out, rows, slot, v, keep, NB: tl.constexpr):
    """Out[row, :, slot] += (1, v, v^2) for every kept key, one bin of every row at a time: a
    row's kept keys of one tile fall in one or two bins, so this takes a pass or two of row sums
    and 3 atomics per row, where one atomic per key issues 3 x BLOCK_M x BLOCK_N of them (masked
    or not). Out is (rows, 3, NB); slot (float, integral) and v are (BLOCK_M, BLOCK_N)."""
    Row = Out + rows * (3 * NB)
    # keys already added (or never kept) move to the sentinel slot NB, so a trip's work on every
    # element of the tile is one compare and three selects besides its row sums
    slot = tl.where(keep, slot, NB)
    v2 = v * v
    bin_now = tl.reduce(slot, 1, MIN)
    while tl.reduce(bin_now, 0, MIN) < NB:
        here = slot == bin_now[:, None]  # rows without keys left match the sentinel: masked below
        count = tl.reduce(here.to(tl.float32), 1, ADD)
        sum_v = tl.reduce(tl.where(here, v, 0.0), 1, ADD)
        sum_v2 = tl.reduce(tl.where(here, v2, 0.0), 1, ADD)
        has = bin_now < NB
        At = Row + tl.where(has, bin_now, 0.0).to(tl.int32)
        tl.atomic_add(At, count, mask=has, sem="relaxed")
        tl.atomic_add(At + NB, sum_v, mask=has, sem="relaxed")
        tl.atomic_add(At + 2 * NB, sum_v2, mask=has, sem="relaxed")
        slot = tl.where(here, NB, slot)
        bin_now = tl.reduce(slot, 1, MIN)


@triton.jit
def zero_rows(Out, rows, in_q, ROW_SIZE: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Zeroes this program's rows of ``Out`` (rows, ROW_SIZE) before any of its threads adds to
    them (``ROW_BLOCK``: a power of two covering a row)."""
    tl.static_assert(ROW_BLOCK >= ROW_SIZE)
    cols = tl.arange(0, ROW_BLOCK)
    tl.store(Out + rows[:, None] * ROW_SIZE + cols[None, :], tl.full([BLOCK_M, ROW_BLOCK], 0.0, tl.float32),
             mask=in_q[:, None] & (cols < ROW_SIZE)[None, :])
    tl.debug_barrier()  # every thread's zeros land before any thread's adds


@triton.jit
def fine_histogram_tiles(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc,
                         q_first, offs_m, Keep, tile_row, Sums, rows, shift, bin_index, cutoff, count_above, sum_y,
                         sum_y2, stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, HEAD_DIM: tl.constexpr,
                         BLOCK_N: tl.constexpr, NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, FULL: tl.constexpr,
                         PRECISION: tl.constexpr):
    """The fine histogram's sums over one of the two loops of listed tiles (``list_slots``): the
    sub-bins into ``Sums``, the moments above the pair returned."""
    start, stop = list_slots(count, full_first, full_end, FULL)
    for j in range(start, stop):
        tile_k, offs_n, z = listed_logits(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit,
                                          q_doc, q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, shift,
                                          scale_z, HEAD_DIM, BLOCK_N, FULL, PRECISION)
        x = z * (NUM_BINS - 1) - bin_index[:, None]  # coarse bins above the lower edge of the pair
        above = x >= 2.0
        y = tl.where(above, x - 2.0, 0.0)
        count_above += tl.reduce(above.to(tl.float32), 1, ADD)
        sum_y += tl.reduce(y, 1, ADD)
        sum_y2 += tl.reduce(y * y, 1, ADD)
        # 2: a key in the pair (above the cutoff); 1: only keys at most one bin below it, so the
        # tile stays in the block mask (tau lies inside the pair; lower keys have p = 0)
        near = x >= cutoff[:, None]
        in_pair = near & (x >= 0.0) & (x < 2.0)
        reach = tl.reduce(tl.reduce(tl.where(in_pair, 2, near.to(tl.int32)), 1, MAX), 0, MAX)
        tl.store(Keep + tile_row + tile_k, (reach > 0).to(tl.int8))
        if reach == 2:
            frac = tl.where(in_pair, x * (FINE_BINS // 2), 0.0)
            sub = tl.minimum(tl.maximum(tl.floor(frac), 0.0), FINE_BINS - 1)
            add_moments_by_row(Sums, rows, sub, frac - sub, in_pair, FINE_BINS + 1)
    return count_above, sum_y, sum_y2


@triton.jit
def fine_histogram_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Bin_index, Cutoff, Sums, Keep,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, ROW_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """Fine histogram of the pair of bins from ``Bin_index`` and the moments above it, into
    ``Sums`` (rows, 3, FINE_BINS + 1), and ``Keep``; see the module doc."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row,
     full_first, full_end) = listed_query_tile(
        Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
        stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
        GROUP, HEAD_DIM, BLOCK_M)
    scale_z = of_query_head(scale_z, h, PER_HEAD)
    shift = tl.load(Shift + rows, mask=in_q, other=0.0)
    bin_index = tl.load(Bin_index + rows, mask=in_q, other=0.0)
    # keys below the cutoff have p = 0: the fine histogram leaves them out (in bins above the
    # pair's lower edge, at least -1: the slack of the ``Keep`` test)
    cutoff = tl.maximum(tl.load(Cutoff + rows, mask=in_q, other=0.0) * (NUM_BINS - 1) - bin_index, -1.0)
    zero_rows(Sums, rows, in_q, 3 * (FINE_BINS + 1), ROW_BLOCK, BLOCK_M)
    count_above = tl.full([BLOCK_M], 0.0, tl.float32)  # the keys above the pair
    sum_y = tl.full([BLOCK_M], 0.0, tl.float32)
    sum_y2 = tl.full([BLOCK_M], 0.0, tl.float32)
    for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
        count_above, sum_y, sum_y2 = fine_histogram_tiles(
            q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first, offs_m,
            Keep, tile_row, Sums, rows, shift, bin_index, cutoff, count_above, sum_y, sum_y2, stride_ks, stride_kd,
            seqlen_q, seqlen_k, scale_z, HEAD_DIM, BLOCK_N, NUM_BINS, FINE_BINS, FULL == 1, PRECISION)
    # column FINE_BINS, which the sub-bins' atomics never reach
    Above = Sums + rows * (3 * (FINE_BINS + 1)) + FINE_BINS
    tl.store(Above, count_above, mask=in_q)
    tl.store(Above + (FINE_BINS + 1), sum_y, mask=in_q)
    tl.store(Above + 2 * (FINE_BINS + 1), sum_y2, mask=in_q)


@triton.jit
def newton_tiles(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                 offs_m, Keep, tile_row, t, ones, f_sum, df_sum, above, closest, stride_ks, stride_kd, seqlen_q,
                 seqlen_k, shift, scale_z, gamma, margin, mark, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 POWER: tl.constexpr, COUNT: tl.constexpr, KEEP: tl.constexpr, FULL: tl.constexpr,
                 UNROLL: tl.constexpr, PRECISION: tl.constexpr, BELOW: tl.constexpr = False):
    """``f_sum``, ``df_sum``, ``above`` and ``closest`` plus, over one of the two loops of listed
    tiles (``list_slots``), sum (z - t)_+^gamma, sum (z - t)_+^(gamma - 1) and with ``COUNT`` the
    count of keys above t (every column of ``above``); with ``KEEP``, ``mark`` (int8) into
    ``Keep[tile]`` where a key of the tile lies above ``t - margin`` (the rest left as they are),
    and into ``closest`` (uint32, the bits of a float32) the smallest gap ``z - t > 0``, or where a
    row has none, a negative float; with ``BELOW`` (and no ``KEEP``), into ``closest`` the
    smallest ``t - z >= 0`` instead (the largest key at or below t), and no marks."""
    start, stop = list_slots(count, full_first, full_end, FULL)
    # UNROLL tiles per trip over the fully visible tiles (the launcher's setting), written in place:
    # Triton 3.6 does not take a helper's result as the factor
    for j in tl.range(start, stop, loop_unroll_factor=UNROLL if FULL else 1):
        tile_k, offs_n, z = listed_logits(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit,
                                          q_doc, q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, shift,
                                          scale_z, HEAD_DIM, BLOCK_N, FULL, PRECISION)
        gap = positive_gap(z, t[:, None])
        p, u = entmax_weights(gap, gamma, POWER)
        f_sum += tl.reduce(p, 1, ADD)
        df_sum += tl.reduce(u, 1, ADD)
        if COUNT:
            above += dot(tl.where(gap > 0, 1.0, 0.0).to(q.dtype), ones, PRECISION)
        if KEEP:
            # one integer min per key gives both: a float's bits as an unsigned int order the
            # positive floats as the floats, and above them the negative ones by size, so a row's
            # min is its smallest positive gap, or where it has none its largest z - t (NaN and
            # -inf, masked keys, last)
            nearest = tl.reduce((z - t[:, None]).to(tl.uint32, bitcast=True), 1, MIN)
            closest = tl.minimum(closest, nearest)
            # each row near the tile stores the mark itself (the same value): no reduction across
            # the program's warps, which would hold every warp at a barrier on every tile
            near = nearest.to(tl.float32, bitcast=True) > -margin
            tl.store(Keep + tile_row + tile_k + tl.full(near.shape, 0, tl.int32), mark, mask=near)
        elif BELOW:  # the same integer min on the other side's differences
            closest = tl.minimum(closest, tl.reduce((t[:, None] - z).to(tl.uint32, bitcast=True), 1, MIN))
    return f_sum, df_sum, above, closest


@triton.jit
def newton_sums_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Point, Rows, Sums, Keep,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z, gamma, keep_margin,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, SOME_ROWS: tl.constexpr, COUNT: tl.constexpr, KEEP: tl.constexpr,
    UNROLL: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """Newton sums at ``Point`` into ``Sums`` (rows, 2, or 3 with ``COUNT``); see the module doc.
    ``SOME_ROWS``: only the query tiles with a row marked in ``Rows`` (int8 per row) read their
    key tiles; the others store zeros (the exact finish after the closed form, and the Newton
    schedule, where rows that are done drop out). ``COUNT`` (the Newton schedule): the third
    column counts the keys above the point. ``KEEP``: ``Keep[tile]`` (zeros from the caller) is set
    to 1 on every tile read where a key of one of its rows lies above ``point - keep_margin``.

    Each row reduction of a tile costs about as much as the tile's product, so the count is a
    product with a tile of ones on the tensor cores (0 and 1 are exact in any dtype, the sums
    float32), accumulated across tiles and reduced once (why: docs/design.md (kernel choices))."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row,
     full_first, full_end) = listed_query_tile(
        Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
        stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
        GROUP, HEAD_DIM, BLOCK_M)
    scale_z = of_query_head(scale_z, h, PER_HEAD)
    gamma = of_query_head(gamma, h, PER_HEAD)
    shift = tl.load(Shift + rows, mask=in_q, other=0.0)
    point = tl.load(Point + rows, mask=in_q, other=0.0)
    if SOME_ROWS:
        marked = tl.reduce(tl.load(Rows + rows, mask=in_q, other=0).to(tl.int32), 0, MAX)
        count = tl.where(marked > 0, count, 0)
        full_first = tl.where(marked > 0, full_first, 0)
        full_end = tl.where(marked > 0, full_end, 0)
    f_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    df_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    ones = tl.full([BLOCK_N, ONES_WIDTH], 1.0, q.dtype)
    above = tl.full([BLOCK_M, ONES_WIDTH], 0.0, tl.float32)  # every column: the row's count
    closest = tl.full([BLOCK_M], 0xFFFFFFFF, tl.uint32)  # not stored: the marks need it only
    for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
        for FORM in tl.static_range(form_copies(POWER)):  # triton_common.runs_form
            if runs_form(gamma, FORM, POWER):
                f_sum, df_sum, above, closest = newton_tiles(
                    q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                    offs_m, Keep, tile_row, point, ones, f_sum, df_sum, above, closest, stride_ks, stride_kd,
                    seqlen_q, seqlen_k, shift, scale_z, gamma, keep_margin, tl.full([], 1, tl.int8), HEAD_DIM,
                    BLOCK_N, copy_power(POWER, FORM), COUNT, KEEP, FULL == 1,
                    UNROLL, PRECISION)
    WIDTH: tl.constexpr = 3 if COUNT else 2
    tl.store(Sums + rows * WIDTH, f_sum, mask=in_q)
    tl.store(Sums + rows * WIDTH + 1, df_sum, mask=in_q)
    if COUNT:
        tl.store(Sums + rows * WIDTH + 2, tl.reduce(above, 1, MAX), mask=in_q)
