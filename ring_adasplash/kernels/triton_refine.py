"""Refinement pass: exact sums near tau over the active key tiles of each query tile.

One program per (query tile, batch x query head); it visits only the key tiles listed for it
(``Tile_index[:Tile_count]``, built from the lower-bound block mask). Two modes, as
``torch_blockwise.refine_pass``:

    NEWTON = False  fine histogram of the keys in coarse bin ``Target`` (absolute index): FINE_BINS
                    sub-bins, count, sum v, sum v^2 with v the position inside the sub-bin
    NEWTON = True   sum (z - t)_+^gamma and sum (z - t)_+^(gamma - 1) at t = ``Target``
"""
import triton
import triton.language as tl

from .triton_stats import ADD, MAX, masked_logits


@triton.jit
def refine_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, Tile_count, Tile_index, Target, Out,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, NEWTON: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = tile_q * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < seqlen_q
    rows = bh.to(tl.int64) * seqlen_q + offs_m

    Q = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=in_q[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_limit = tl.load(Q_limit + offs_m, mask=in_q, other=-1)
    q_doc = tl.load(Q_doc + offs_m, mask=in_q, other=-1)
    target = tl.load(Target + rows, mask=in_q, other=0.0)

    list_id = bh * tl.num_programs(0) + tile_q
    count = tl.load(Tile_count + list_id)
    Tile_index = Tile_index + list_id.to(tl.int64) * num_k_tiles

    fine = tl.arange(0, FINE_BINS)
    hist_c = tl.full([BLOCK_M, FINE_BINS], 0.0, tl.float32)
    hist_1 = tl.full([BLOCK_M, FINE_BINS], 0.0, tl.float32)
    hist_2 = tl.full([BLOCK_M, FINE_BINS], 0.0, tl.float32)
    f_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    df_sum = tl.full([BLOCK_M], 0.0, tl.float32)

    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = masked_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                          stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, DOT_F32, IEEE)
        if NEWTON:
            gap = tl.maximum(z - target[:, None], 0.0)
            log_gap = tl.log2(tl.where(gap > 0, gap, 1.0))
            f_sum += tl.reduce(tl.where(gap > 0, tl.exp2(gamma * log_gap), 0.0), 1, ADD)
            df_sum += tl.reduce(tl.where(gap > 0, tl.exp2((gamma - 1.0) * log_gap), 0.0), 1, ADD)
        else:
            scaled = z * (NUM_BINS - 1)
            idx = tl.floor(scaled)
            keep = idx == target[:, None]  # false for invisible pairs (idx = -inf)
            if tl.reduce(tl.reduce(keep.to(tl.int32), 1, MAX), 0, MAX) > 0:
                frac = tl.where(keep, (scaled - idx) * FINE_BINS, 0.0)
                sub = tl.minimum(tl.maximum(tl.floor(frac), 0.0), FINE_BINS - 1)
                v = frac - sub
                v2 = v * v
                sub = tl.where(keep, sub, -1.0)
                for j in tl.static_range(FINE_BINS):
                    here = sub == j
                    column = fine[None, :] == j
                    hist_c += tl.where(column, tl.reduce(here.to(tl.float32), 1, ADD)[:, None], 0.0)
                    hist_1 += tl.where(column, tl.reduce(tl.where(here, v, 0.0), 1, ADD)[:, None], 0.0)
                    hist_2 += tl.where(column, tl.reduce(tl.where(here, v2, 0.0), 1, ADD)[:, None], 0.0)

    if NEWTON:
        tl.store(Out + rows * 2, f_sum, mask=in_q)
        tl.store(Out + rows * 2 + 1, df_sum, mask=in_q)
    else:
        Out = Out + rows[:, None] * (3 * FINE_BINS) + fine[None, :]
        tl.store(Out, hist_c, mask=in_q[:, None])
        tl.store(Out + FINE_BINS, hist_1, mask=in_q[:, None])
        tl.store(Out + 2 * FINE_BINS, hist_2, mask=in_q[:, None])
