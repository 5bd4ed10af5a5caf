"""The max pass, the one dense Q.K^T sweep: tau floor, row max and per-tile gaps.

One program per (query tile, batch x query head). ``tau_floor_kernel`` first takes a *tau floor*
per row: the tau of the row's keys in the last two key tiles of its span (causal: the diagonal and
the tile before), by Newton steps from below; any subset of the keys has a smaller tau, so this
bounds tau from below. ``max_kernel`` then walks every key tile that may hold a visible key,
nearest first, keeping the running max of the raw scores ``q . k`` per row (the shift of every
later pass, ``stats.Relative``), and per tile writes the *gap*, in z = scale_z * q . k: max over
the tile's rows of (the row's largest z in the tile - ``stats.gap_reference``, max(tau floor,
running max - 1)), computed relative to the running max. That reference is a lower bound of tau (no p exceeds 1, so
tau >= max - 1) that only grows along the sweep, so a gap bounds from above how far any key of
the tile rises over the final one: every later tile test (``stats.histogram_mask``,
``stats.lower_bound_mask``) compares gaps with per-row thresholds relative to it. Where the
probability mass sits near the diagonal (tau well above max - 1), the floor keeps the histogram
off the tiles whose keys only reach within one of the max.

The coarse histogram is then taken by ``triton_histogram.histogram_kernel`` over only the tiles
that reach the bin of some row's floor: with the final row max known there is nothing to shift,
and the dense sweep stays a plain max (why: docs/design.md (kernel choices)).

Two small kernels finish the pass, each one launch where PyTorch took several:
``encode_gaps_kernel`` turns the float gaps into their one-byte codes (``stats.encode_gaps``),
and ``relative_kernel``, after the score max is merged over key blocks, gives the rows' shift,
max, floor and gap reference in z (``stats.relative``).
"""
import triton
import triton.language as tl

from .triton_common import (ADD, MAX, at_head, masked_logits, of_query_head, offset_strides, positive_gap,
                            power_and_slope, query_tile, row_max_with_nan, row_offsets, tile_logits, tile_row)


@triton.jit
def nearest_tau_floor(s_near, s_next, scale_z, gamma, POWER: tl.constexpr, STEPS: tl.constexpr,
                      MARGIN: tl.constexpr):
    """Per row, a lower bound of tau from the raw scores of two tiles, as a raw score
    (``torch_blockwise.nearest_tau_floor``): Newton steps on ``f(t) = sum (z - t)_+^gamma = 1``,
    z relative to the largest of them, from -1; f is convex and decreasing, so each step stays
    below the root. -inf for rows with no visible key there."""
    top = tl.maximum(row_max_with_nan(s_near), row_max_with_nan(s_next), propagate_nan=tl.PropagateNan.ALL)
    has = (top > float("-inf")) & (top < float("inf"))  # NaN fails both
    top = tl.where(has, top, 0.0)
    z_near = (s_near - top[:, None]) * scale_z
    z_next = (s_next - top[:, None]) * scale_z
    t = top * 0.0 - 1.0
    for _ in range(0, STEPS):
        f_near, slope_near = power_and_slope(positive_gap(z_near, t[:, None]), gamma, POWER)
        f_next, slope_next = power_and_slope(positive_gap(z_next, t[:, None]), gamma, POWER)
        f = tl.reduce(f_near, 1, ADD) + tl.reduce(f_next, 1, ADD)
        slope = tl.reduce(slope_near, 1, ADD) + tl.reduce(slope_next, 1, ADD)
        t += (f - 1.0) / tl.maximum(gamma * slope, 1e-30)
    # back to raw units, lowered by two ulps of the top score for the rounding of the sum
    floor = top + (t - MARGIN) / scale_z - tl.abs(top) * (2.0 * 1.1920929e-07)
    return tl.where(has, floor, float("-inf"))


@triton.jit
def span_tile_scores(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tile_k, lo, no_shift,
                     stride_ks, stride_kd, seqlen_q, seqlen_k,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Raw scores ``q . k`` of key tile ``tile_k`` with invisible pairs at -inf, all -inf when it
    lies below the span's first tile ``lo`` (a tile outside the span is read at tile 0 and counts
    as all invisible)."""
    s = masked_logits(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tl.maximum(tile_k, 0),
                      stride_ks, stride_kd, seqlen_q, seqlen_k, no_shift, 1.0, HEAD_DIM, BLOCK_N, PRECISION)
    return tl.where(tile_k >= lo, s, float("-inf"))


@triton.jit
def tau_floor_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_tile_lo, K_tile_hi, Tau_floor,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, STEPS: tl.constexpr, MARGIN: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """Tau floor of every row (``backend.Maxima``) from the last two key tiles of its query tile's
    span (causal: the diagonal and the tile before). Its own launch, not a prologue of
    ``max_kernel`` (why: docs/design.md (kernel choices))."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc, q_first = query_tile(
        Q, Q_limit, Q_doc, Q_first, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M)
    K = at_head(K, b, h // GROUP, stride_kb, stride_kh)
    lo = tl.load(K_tile_lo + tile_q)
    hi = tl.load(K_tile_hi + tile_q)
    no_shift = tl.full([BLOCK_M], 0.0, tl.float32)
    s_near = span_tile_scores(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, hi - 1, lo, no_shift,
                              stride_ks, stride_kd, seqlen_q, seqlen_k, HEAD_DIM, BLOCK_N, PRECISION)
    s_next = span_tile_scores(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, hi - 2, lo, no_shift,
                              stride_ks, stride_kd, seqlen_q, seqlen_k, HEAD_DIM, BLOCK_N, PRECISION)
    tau_floor = nearest_tau_floor(s_near, s_next, of_query_head(scale_z, h, PER_HEAD),
                                  of_query_head(gamma, h, PER_HEAD), POWER, STEPS, MARGIN)
    tl.store(Tau_floor + row_offsets(bh, seqlen_q, offs_m), tau_floor, mask=in_q)


@triton.jit
def gap_code(gap, GAP_LOW: tl.constexpr, GAP_STEP: tl.constexpr, EDGE_SLACK: tl.constexpr):
    """``stats.encode_gaps`` of one tile gap: 1 + the number of edges ``GAP_LOW + j GAP_STEP`` (j =
    0 ... 253) below it; ``GAP_NONE`` (0) for -inf, 255 for NaN. A gap within ``EDGE_SLACK``
    steps above an edge counts as on it, as bucketing against the float32 edges has it (the
    diagonal tile's gap is often exactly 1.0, the last edge, where the float32 division lands a
    little above); the codes' ``GAP_ROUNDING`` allows ten times that."""
    below = tl.minimum(tl.maximum(tl.ceil((gap - GAP_LOW) / GAP_STEP - EDGE_SLACK), 0.0), 254.0)
    code = tl.where(gap == float("-inf"), 0.0, tl.where(gap != gap, 255.0, below + 1.0))
    return code.to(tl.uint8)


@triton.jit
def max_tiles(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, Tile_gap, tau_floor, m_i, first, end,
              stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              FULL: tl.constexpr, PRECISION: tl.constexpr):
    """The running max ``m_i`` over key tiles ``end - 1`` down to ``first`` (``FULL``: all of them
    with every pair visible), and their gaps into ``Tile_gap``."""
    no_shift = tl.full(m_i.shape, 0.0, tl.float32)
    for step in range(0, end - first):
        tile_k = end - 1 - step
        s = tile_logits(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tile_k, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, no_shift, 1.0, HEAD_DIM, BLOCK_N, FULL, PRECISION)
        s_max = row_max_with_nan(s)
        m_i = tl.maximum(m_i, s_max, propagate_nan=tl.PropagateNan.ALL)
        # in z, relative to the running max: differences of nearby scores are exact
        reference = tl.maximum((tau_floor - m_i) * scale_z, -1.0)
        gap = (s_max - m_i) * scale_z - reference
        seen = (s_max > float("-inf")) & (m_i < float("inf"))  # NaN fails the second
        tl.store(Tile_gap + tile_k, tl.reduce(tl.where(seen, gap, float("-inf")), 0, MAX))
    return m_i


@triton.jit
def max_kernel(
    Q, K, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_tile_lo, K_tile_hi, K_full_lo, K_full_hi, Row_max,
    Tau_floor, Tile_gap,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_MAX: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """Dense sweep, nearest key tiles first: running max of the raw scores over visible keys
    (starting from ``Row_max`` when ``HAS_ROW_MAX``, updated in place; +inf on rows that see a NaN)
    and the gap of every (query tile, key tile), in z: max over the tile's rows of (the row's
    largest z in the tile - max(tau floor, running max - 1)), all relative to the running max
    (``backend.Maxima``, ``stats.gap_reference``; ``Tau_floor``, a raw score, from
    ``tau_floor_kernel``)."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc, q_first = query_tile(
        Q, Q_limit, Q_doc, Q_first, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M)
    K = at_head(K, b, h // GROUP, stride_kb, stride_kh)
    scale_z = of_query_head(scale_z, h, PER_HEAD)
    Tile_gap = Tile_gap + tile_row(tile_q, bh, num_k_tiles)
    rows = row_offsets(bh, seqlen_q, offs_m)
    Row_max = Row_max + rows
    tau_floor = tl.load(Tau_floor + rows, mask=in_q, other=float("-inf"))

    if HAS_ROW_MAX:
        m_i = tl.load(Row_max, mask=in_q, other=float("-inf"))
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # key tiles [lo, hi) hold every visible key of this query tile; [full_lo, full_hi) need no mask
    lo = tl.load(K_tile_lo + tile_q)
    hi = tl.load(K_tile_hi + tile_q)
    full_lo = tl.load(K_full_lo + tile_q)
    full_hi = tl.load(K_full_hi + tile_q)
    # nearest first (causal: the diagonal), where a row's max usually is: the running max is then
    # close to the final one early, and the gaps of the far tiles come out tight. Three loops, the
    # middle one over the tiles that need no mask: no branch inside a loop (triton_common.list_slots)
    full_hi = tl.minimum(tl.maximum(full_hi, lo), hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), full_hi)
    m_i = max_tiles(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, Tile_gap, tau_floor, m_i, full_hi,
                    hi, stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, HEAD_DIM, BLOCK_N, False, PRECISION)
    m_i = max_tiles(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, Tile_gap, tau_floor, m_i, full_lo,
                    full_hi, stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, HEAD_DIM, BLOCK_N, True, PRECISION)
    m_i = max_tiles(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, Tile_gap, tau_floor, m_i, lo,
                    full_lo, stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, HEAD_DIM, BLOCK_N, False, PRECISION)
    tl.store(Row_max, tl.where(m_i == m_i, m_i, float("inf")), mask=in_q)


@triton.jit
def encode_gaps_kernel(Tile_gap, Gap_codes, num_tiles, GAP_LOW: tl.constexpr, GAP_STEP: tl.constexpr,
                       EDGE_SLACK: tl.constexpr, BLOCK: tl.constexpr):
    """``stats.encode_gaps`` of ``BLOCK`` of the max kernel's float tile gaps (``gap_code``). A
    launch of its own: coding each gap inside the max kernel's loops added a tenth to their
    instructions."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_tiles
    gap = tl.load(Tile_gap + offs, mask=in_range, other=float("-inf"))
    tl.store(Gap_codes + offs, gap_code(gap, GAP_LOW, GAP_STEP, EDGE_SLACK), mask=in_range)


@triton.jit
def relative_kernel(Score_max, Tau_floor, Shift, Row_max, Floor, Reference, Nonfinite, Empty, scale_z, num_rows,
                    seqlen_q, num_heads, PER_HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """``stats.relative`` of ``BLOCK`` rows of (B, H, Sq): from the merged score max and the tau
    floor (raw), the shift, the row max and the floor in z, the rows that see a non-finite score,
    ``stats.gap_reference`` and the empty rows (bools as int8)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_rows
    score_max = tl.load(Score_max + offs, mask=in_range, other=0.0)
    tau_floor = tl.load(Tau_floor + offs, mask=in_range, other=0.0)
    if PER_HEAD:
        scale_z = tl.load(scale_z + (offs // seqlen_q) % num_heads, mask=in_range, other=0.0)
    has = (score_max > float("-inf")) & (score_max < float("inf"))
    shift = tl.where(has, score_max, 0.0)
    row_max = tl.where(has, 0.0, float("-inf"))
    floor = tl.where(has, scale_z * (tau_floor - shift), row_max)
    tl.store(Shift + offs, shift, mask=in_range)
    tl.store(Row_max + offs, row_max, mask=in_range)
    tl.store(Floor + offs, floor, mask=in_range)
    tl.store(Reference + offs, tl.maximum(floor, row_max - 1.0, propagate_nan=tl.PropagateNan.ALL), mask=in_range)
    tl.store(Nonfinite + offs, (score_max == float("inf")).to(tl.int8), mask=in_range)
    tl.store(Empty + offs, (~has).to(tl.int8), mask=in_range)
