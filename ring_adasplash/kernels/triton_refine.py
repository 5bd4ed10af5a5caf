"""Sparse sums of the statistics passes, over the listed key tiles of each query tile.

One program per (query tile, batch x query head); it visits only the key tiles listed for it
(``Tile_index[:Tile_count]``).

``histogram_kernel``: the coarse counts (``torch_blockwise.histogram_pass``): keys per local bin
``K - floor(z (NB - 1)) < kept bins`` (``stats.kept_bins``, from the row max and the tau floor,
computed here), ``K = floor(row max (NB - 1))``. A tile adds its counts by row sums of packed
words: each key sets one 8-bit field (4 bins to an int32 word), so a row sum of a word counts 4
bins at once (at most BLOCK_N keys per field); only the words a tile's keys reach are summed, and
the counts stay in registers until the end: each row belongs to one program, so nothing is
atomic. It also writes ``Keep[tile]``: whether some row has a key in its own kept bins; tiles
without one hold only keys with z < row max - 1 <= tau. (Counting this way, rather than adding
count, sum u and sum u^2 per row one distinct bin at a time, took the pass from 7.2 to 3.9 ms on
one H200, 32K tokens, D 64, bf16, causal, 83% block sparsity: ``benchmarks/histogram_variants.py``.)

``refine_kernel`` (``MODE``):

    FINE    ``Target`` = the lower of the two coarse bins that hold tau (``stats.Bracket``): per
            row, FINE_BINS sub-bins of the pair with count, sum v, sum v^2 (v the position inside
            the sub-bin) of its keys at or above ``Low`` (a lower bound of tau), and count, sum y,
            sum y^2 of the keys above the pair (``refine_pass``); ``Keep[tile]``: the tile has a
            key at or above ``Low`` and no more than one bin below the pair
    NEWTON  sum (z - t)_+^gamma and sum (z - t)_+^(gamma - 1) at t = ``Target`` (``refine_pass``)

Fine histograms are added into ``Out`` (each program first zeroes its own rows: the zeros and the
adds then meet in L2, where a zero-fill launch before would write them to memory and the adds
read them back; each row belongs to one program, so nothing contends across programs) by
``add_moments_by_row``: one distinct sub-bin of every row
at a time, row sums, then 3 atomics per row. (One atomic per key instead, which issues an
instruction per element of the tile, masked or not, was slower: one H200, 32K tokens, D 64, bf16,
causal, 83% block sparsity, 7.0 against 6.0 ms.) The sums above the pair are row sums kept in
registers and stored once (adding those keys as one more slot of the per-row adds was slower:
7.3 against 5.6 ms; most tiles the pass reads hold some).
"""
import triton
import triton.language as tl

from .triton_stats import ADD, MAX, MIN, listed_tiles, query_tile, tile_logits


@triton.jit
def add_moments_by_row(Out, rows, slot, v, keep, NB: tl.constexpr):
    """Out[row, :, slot] += (1, v, v^2) for every kept key, one bin of every row at a time: a
    row's kept keys of one tile fall in one or two bins, so this takes a pass or two of row sums
    and 3 atomics per row, where one atomic per key issues 3 x BLOCK_M x BLOCK_N of them (masked
    or not). Out is (rows, 3, NB); slot (float, integral) and v are (BLOCK_M, BLOCK_N)."""
    Row = Out + rows * (3 * NB)
    # keys already added (or never kept) move to the sentinel slot NB, so a trip's work on every
    # element of the tile is one compare and three selects besides its row sums; with a separate
    # keep mask it was nine operations, and this per-element work is what bounds the pass (one
    # H100, 32K tokens, D 64, 83% block sparsity: 5.20 -> 4.73 ms)
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
def histogram_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, K_full_lo, K_full_hi, Tile_count, Tile_index, Row_max, Tau_floor, Out, Keep,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z, floor_margin,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    """Coarse counts (NUM_BINS per row, float32, written once) and ``Keep``; see the module doc."""
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(NUM_BINS % 4 == 0 and BLOCK_N < 256)  # 4 bins of 8 bits to a word
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, DOT_F32)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    # reference and kept bins as ``stats.bin_reference`` / ``stats.kept_bins`` (same float32 ops)
    row_max = tl.load(Row_max + rows, mask=in_q, other=float("-inf"))
    ref = tl.where(row_max > float("-inf"), tl.floor(row_max * (NUM_BINS - 1)), -1e9)
    tau_floor = tl.load(Tau_floor + rows, mask=in_q, other=float("-inf"))
    lowest = tl.floor((tau_floor - floor_margin) * (NUM_BINS - 1))
    bins = tl.where(lowest > float("-inf"), tl.minimum(tl.maximum(ref - lowest + 1.0, 1.0), NUM_BINS), NUM_BINS)
    bins = tl.where(row_max > float("-inf"), bins, 0.0)
    words = (tl.reduce(bins, 0, MAX).to(tl.int32) + 3) // 4  # words any row of this query tile fills

    count, Tile_index, tile_row, full_lo, full_hi = listed_tiles(Tile_count, Tile_index, K_full_lo, K_full_hi,
                                                                 tile_q, bh, num_k_tiles)
    cols = tl.arange(0, NUM_BINS)
    counts = tl.full([BLOCK_M, NUM_BINS], 0, tl.int32)
    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, scale_z, (tile_k >= full_lo) & (tile_k < full_hi), DOT_F32, IEEE)
        # local bin, at least 0 (should a recomputed logit round above its row max); invisible: +inf
        local = tl.maximum(ref[:, None] - tl.floor(z * (NUM_BINS - 1)), 0.0)
        local = tl.where(local < bins[:, None], local, NUM_BINS).to(tl.int32)
        top = tl.reduce(tl.reduce(local, 1, MIN), 0, MIN)  # the highest bin any key of the tile reaches
        if top < NUM_BINS:
            tl.store(Keep + tile_row + tile_k, 1)
            one = 1 << ((local & 3) * 8)
            word = local >> 2
            for w in range(top >> 2, words):
                packed = tl.reduce(tl.where(word == w, one, 0), 1, ADD)
                counts += tl.where((cols >> 2)[None, :] == w, (packed[:, None] >> ((cols & 3) * 8)[None, :]) & 255, 0)
    tl.store(Out + rows[:, None] * NUM_BINS + cols[None, :], counts.to(tl.float32), mask=in_q[:, None])


@triton.jit
def refine_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, K_full_lo, K_full_hi, Tile_count, Tile_index, Target, Low, Out, Keep,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, MODE: tl.constexpr, ROW_BLOCK: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    """``MODE`` 0: fine histogram of the pair of bins from ``Target`` and the moments above it, into
    ``Out`` (rows, 3, FINE_BINS + 1; ``ROW_BLOCK``: a power of two covering a row); 1: Newton sums
    at ``Target`` into ``Out`` (rows, 2)."""
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, DOT_F32)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    target = tl.load(Target + rows, mask=in_q, other=0.0)
    if MODE == 0:
        # keys below ``Low`` (a lower bound of tau) have p = 0: the fine histogram leaves them out
        # (in bins above the pair's lower edge, at least -1: the slack of the ``Keep`` test)
        low = tl.maximum(tl.load(Low + rows, mask=in_q, other=0.0) * (NUM_BINS - 1) - target, -1.0)
        ROW_SIZE: tl.constexpr = 3 * (FINE_BINS + 1)
        tl.static_assert(ROW_BLOCK >= ROW_SIZE)
        cols = tl.arange(0, ROW_BLOCK)
        tl.store(Out + rows[:, None] * ROW_SIZE + cols[None, :], tl.full([BLOCK_M, ROW_BLOCK], 0.0, tl.float32),
                 mask=in_q[:, None] & (cols < ROW_SIZE)[None, :])
        tl.debug_barrier()  # every thread's zeros land before any thread's adds

    count, Tile_index, tile_row, full_lo, full_hi = listed_tiles(Tile_count, Tile_index, K_full_lo, K_full_hi,
                                                                 tile_q, bh, num_k_tiles)
    f_sum = tl.full([BLOCK_M], 0.0, tl.float32)  # Newton sums
    df_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    count_above = tl.full([BLOCK_M], 0.0, tl.float32)  # fine: the keys above the pair
    sum_y = tl.full([BLOCK_M], 0.0, tl.float32)
    sum_y2 = tl.full([BLOCK_M], 0.0, tl.float32)

    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, scale_z, (tile_k >= full_lo) & (tile_k < full_hi), DOT_F32, IEEE)
        if MODE == 1:  # Newton sums
            gap = tl.maximum(z - target[:, None], 0.0)
            log_gap = tl.log2(tl.where(gap > 0, gap, 1.0))
            f_sum += tl.reduce(tl.where(gap > 0, tl.exp2(gamma * log_gap), 0.0), 1, ADD)
            df_sum += tl.reduce(tl.where(gap > 0, tl.exp2((gamma - 1.0) * log_gap), 0.0), 1, ADD)
        else:
            x = z * (NUM_BINS - 1) - target[:, None]  # coarse bins above the lower edge of the pair
            above = x >= 2.0
            y = tl.where(above, x - 2.0, 0.0)
            count_above += tl.reduce(above.to(tl.float32), 1, ADD)
            sum_y += tl.reduce(y, 1, ADD)
            sum_y2 += tl.reduce(y * y, 1, ADD)
            # 2: a key in the pair (above ``low``); 1: only keys at most one bin below it, so the
            # tile stays in the block mask (tau lies inside the pair; lower keys have p = 0)
            near = x >= low[:, None]
            in_pair = near & (x >= 0.0) & (x < 2.0)
            reach = tl.reduce(tl.reduce(tl.where(in_pair, 2, near.to(tl.int32)), 1, MAX), 0, MAX)
            tl.store(Keep + tile_row + tile_k, (reach > 0).to(tl.int8))
            if reach == 2:
                frac = tl.where(in_pair, x * (FINE_BINS // 2), 0.0)
                sub = tl.minimum(tl.maximum(tl.floor(frac), 0.0), FINE_BINS - 1)
                add_moments_by_row(Out, rows, sub, frac - sub, in_pair, FINE_BINS + 1)

    if MODE == 1:
        tl.store(Out + rows * 2, f_sum, mask=in_q)
        tl.store(Out + rows * 2 + 1, df_sum, mask=in_q)
    else:  # column FINE_BINS, which the sub-bins' atomics never reach
        Above = Out + rows * (3 * (FINE_BINS + 1)) + FINE_BINS
        tl.store(Above, count_above, mask=in_q)
        tl.store(Above + (FINE_BINS + 1), sum_y, mask=in_q)
        tl.store(Above + 2 * (FINE_BINS + 1), sum_y2, mask=in_q)
