"""Output pass: for a known tau, sum p v, sum u v, sum u and the support, over active key tiles.

One program per (query tile, batch x query head), visiting only its listed key tiles. With
``gap = (z - tau)_+``:  p = gap^gamma, u = gap^(gamma - 1) (0 off the support), chosen by
ALPHA_MODE: 0 alpha 1.5 (p = gap^2, u = gap), 1 alpha 2 (p = gap, u = 1[gap > 0]), 2 any other
alpha (powers through exp2/log2). P and U meet V in V's dtype with fp32 accumulation, as in flash
attention. ``Nonzero[tile]`` is set for every visited tile that holds a key with p > 0.
"""
import triton
import triton.language as tl

from .triton_stats import ADD, MAX, listed_tiles, query_tile, tile_logits


@triton.jit
def entmax_weights(gap, gamma, ALPHA_MODE: tl.constexpr):
    """p = gap^gamma and u = gap^(gamma - 1) on the support (gap > 0), 0 elsewhere."""
    if ALPHA_MODE == 0:
        p = gap * gap
        u = gap
    elif ALPHA_MODE == 1:
        p = gap
        u = tl.where(gap > 0, 1.0, 0.0)
    else:
        log_gap = tl.log2(tl.where(gap > 0, gap, 1.0))
        p = tl.where(gap > 0, tl.exp2(gamma * log_gap), 0.0)
        u = tl.where(gap > 0, tl.exp2((gamma - 1.0) * log_gap), 0.0)
    return p, u


@triton.jit
def output_kernel(
    Q, K, V, Q_limit, Q_doc, K_pos, K_doc, K_full_lo, K_full_hi, Tile_count, Tile_index, Tau,
    Out, Out_u, U_sum, Support, Nonzero,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALPHA_MODE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, DOT_F32)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    V = V + b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    tau = tl.load(Tau + rows, mask=in_q, other=float("inf"))

    count, Tile_index, tile_row, full_lo, full_hi = listed_tiles(Tile_count, Tile_index, K_full_lo, K_full_hi,
                                                                 tile_q, bh, num_k_tiles)
    Nonzero = Nonzero + tile_row
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    acc_u = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    u_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    support = tl.full([BLOCK_M], 0.0, tl.float32)

    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, scale_z, (tile_k >= full_lo) & (tile_k < full_hi), DOT_F32, IEEE)
        gap = tl.maximum(z - tau[:, None], 0.0)
        in_support = gap > 0
        p, u = entmax_weights(gap, gamma, ALPHA_MODE)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=(offs_n < seqlen_k)[:, None], other=0.0)
        p = p.to(v.dtype)
        u_v = u.to(v.dtype)
        if DOT_F32:
            v = v.to(tl.float32)
            p = p.to(tl.float32)
            u_v = u_v.to(tl.float32)
        if IEEE:
            acc += tl.dot(p, v, input_precision="ieee")
            acc_u += tl.dot(u_v, v, input_precision="ieee")
        else:
            acc += tl.dot(p, v)
            acc_u += tl.dot(u_v, v)
        u_sum += tl.reduce(u, 1, ADD)
        n_support = tl.reduce(in_support.to(tl.float32), 1, ADD)
        support += n_support
        tl.store(Nonzero + tile_k, (tl.reduce(n_support, 0, MAX) > 0).to(tl.int8))

    Out = Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    Out_u = Out_u + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(Out, acc, mask=in_q[:, None])
    tl.store(Out_u, acc_u, mask=in_q[:, None])
    tl.store(U_sum + rows, u_sum, mask=in_q)
    tl.store(Support + rows, support, mask=in_q)
