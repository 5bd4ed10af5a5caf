"""The histogram pass: coarse counts of the keys near tau, over the listed key tiles.

One program per (query tile, batch x query head); it visits only the key tiles listed for it
(``Tile_index[:Tile_count]``). ``histogram_kernel`` (``torch_blockwise.histogram_pass``): keys
per local bin ``K - floor(z (NB - 1)) < kept bins`` (``stats.kept_bins``, from the row max and
the tau floor, computed here), ``K = floor(row max (NB - 1))``. A tile adds its counts by row
sums of packed words: each key sets one 8-bit field (4 bins to an int32 word), so a row sum of a
word counts 4 bins at once (at most BLOCK_N keys per field); only the words a tile's keys reach
are summed, and the counts stay in registers until the end: each row belongs to one program, so
nothing is atomic (why: docs/design.md (kernel choices)). It also writes ``Keep[tile]``: whether
some row has a key in its own kept bins; tiles without one hold only keys with
z < gap_reference <= tau.
"""
import triton
import triton.language as tl

from .triton_common import ADD, MAX, MIN, list_slots, listed_logits, listed_query_tile, of_query_head, offset_strides


@triton.jit
def kept_bins(Row_max, Tau_floor, rows, in_q, floor_margin, NUM_BINS: tl.constexpr):
    """The reference ``stats.bin_reference`` and the number of kept bins ``stats.kept_bins`` of
    each row (same float32 ops)."""
    row_max = tl.load(Row_max + rows, mask=in_q, other=float("-inf"))
    ref = tl.where(row_max > float("-inf"), tl.floor(row_max * (NUM_BINS - 1)), -1e9)
    tau_floor = tl.load(Tau_floor + rows, mask=in_q, other=float("-inf"))
    floor_bin = tl.floor((tau_floor - floor_margin) * (NUM_BINS - 1))
    bins = tl.where(floor_bin > float("-inf"), tl.minimum(tl.maximum(ref - floor_bin + 1.0, 1.0), NUM_BINS), NUM_BINS)
    return ref, tl.where(row_max > float("-inf"), bins, 0.0)


@triton.jit
def add_packed_counts(counts, local, top, words, NUM_BINS: tl.constexpr):
    """``counts`` (BLOCK_M, NUM_BINS) int32 plus, per row, the keys of each local bin (``local``
    (BLOCK_M, BLOCK_N) int32, NUM_BINS where not kept), words ``top >> 2`` to ``words`` only."""
    cols = tl.arange(0, NUM_BINS)
    one = 1 << ((local & 3) * 8)
    word = local >> 2
    for w in range(top >> 2, words):
        packed = tl.reduce(tl.where(word == w, one, 0), 1, ADD)
        counts += tl.where((cols >> 2)[None, :] == w, (packed[:, None] >> ((cols & 3) * 8)[None, :]) & 255, 0)
    return counts


@triton.jit
def histogram_tiles(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                    offs_m, Keep, tile_row, shift, ref, bins, words, counts, stride_ks, stride_kd, seqlen_q, seqlen_k,
                    scale_z, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_BINS: tl.constexpr,
                    FULL: tl.constexpr, PRECISION: tl.constexpr):
    """``counts`` plus the counts of one of the two loops of listed tiles (``list_slots``)."""
    start, stop = list_slots(count, full_first, full_end, FULL)
    for j in range(start, stop):
        tile_k, offs_n, z = listed_logits(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit,
                                          q_doc, q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, shift,
                                          scale_z, HEAD_DIM, BLOCK_N, FULL, PRECISION)
        # local bin, at least 0 (should a recomputed logit round above its row max); invisible: +inf
        local = tl.maximum(ref[:, None] - tl.floor(z * (NUM_BINS - 1)), 0.0)
        local = tl.where(local < bins[:, None], local, NUM_BINS).to(tl.int32)
        top = tl.reduce(tl.reduce(local, 1, MIN), 0, MIN)  # the highest bin any key of the tile reaches
        if top < NUM_BINS:
            tl.store(Keep + tile_row + tile_k, 1)
            counts = add_packed_counts(counts, local, top, words, NUM_BINS)
    return counts


@triton.jit
def histogram_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Row_max, Tau_floor, Hist, Keep,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z, floor_margin,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """Coarse counts ``Hist`` (NUM_BINS per row, float32, written once) and ``Keep``; see the
    module doc."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(NUM_BINS % 4 == 0 and BLOCK_N < 256)  # 4 bins of 8 bits to a word
    (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row,
     full_first, full_end) = listed_query_tile(
        Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
        stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
        GROUP, HEAD_DIM, BLOCK_M)
    scale_z = of_query_head(scale_z, h, PER_HEAD)
    shift = tl.load(Shift + rows, mask=in_q, other=0.0)
    ref, bins = kept_bins(Row_max, Tau_floor, rows, in_q, floor_margin, NUM_BINS)
    words = (tl.reduce(bins, 0, MAX).to(tl.int32) + 3) // 4  # words any row of this query tile fills
    counts = tl.full([BLOCK_M, NUM_BINS], 0, tl.int32)
    for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
        counts = histogram_tiles(q, K, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc,
                                 q_first, offs_m, Keep, tile_row, shift, ref, bins, words, counts, stride_ks, stride_kd,
                                 seqlen_q, seqlen_k, scale_z, HEAD_DIM, BLOCK_N, NUM_BINS, FULL == 1, PRECISION)
    cols = tl.arange(0, NUM_BINS)
    tl.store(Hist + rows[:, None] * NUM_BINS + cols[None, :], counts.to(tl.float32), mask=in_q[:, None])
