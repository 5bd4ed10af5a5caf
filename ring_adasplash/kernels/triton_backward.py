"""Backward pass over the nonzero tiles: a dK/dV kernel and a dQ kernel, no atomics.

With ``gap = (z - tau)_+``, ``p = gap^gamma``, ``u = gap^(gamma - 1)``, ``g = dO . v`` and the row
term ``delta``:  ds = u (g - delta),  dq = scale ds k,  dk = scale ds^T q,  dv = p^T dO.

``dkdv_kernel``: one program per (key tile, batch x key head); it loops over the GROUP query heads
that share the key head and, for each, over the query tiles listed as nonzero for this key tile.
``dq_kernel``: one program per (query tile, batch x query head), over its nonzero key tiles. With
``COMPUTE_DELTA`` it first computes its rows' ``delta = (dO . sum u v) / sum u`` (0 where
sum u = 0) from the dO tile it loads anyway, and stores it for the dK/dV kernel launched after: a
separate launch for delta cost 70 us of host time on an H100 machine, at 8K tokens, where the
host's time bounds the step.
Operands meet in the input dtype (P and dS cast, as flash attention does) with fp32 accumulation.
"""
import triton
import triton.language as tl

from .triton_output import entmax_weights
from .triton_stats import ADD


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, Q_limit, Q_doc, K_pos, K_doc, Tile_count, Tile_index, Tau, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    seqlen_q, seqlen_k, num_heads, num_heads_kv, num_q_tiles, scale_z, softmax_scale, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALPHA_MODE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_k = tl.program_id(0)
    bhk = tl.program_id(1)
    num_k_tiles = tl.num_programs(0)
    b = bhk // num_heads_kv
    hk = bhk % num_heads_kv
    offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n < seqlen_k

    K = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    V = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=in_k[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=in_k[:, None], other=0.0)
    in_dtype = k.dtype
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    k_pos = tl.load(K_pos + offs_n, mask=in_k, other=0)
    k_doc = tl.load(K_doc + offs_n, mask=in_k, other=0)

    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * num_heads + h
        Qh = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        DOh = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        list_id = bh * num_k_tiles + tile_k
        count = tl.load(Tile_count + list_id)
        Index = Tile_index + list_id.to(tl.int64) * num_q_tiles
        for i in range(0, count):
            tile_q = tl.load(Index + i)
            offs_m = tile_q * BLOCK_M + tl.arange(0, BLOCK_M)
            in_q = offs_m < seqlen_q
            rows = bh.to(tl.int64) * seqlen_q + offs_m
            q = tl.load(Qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=in_q[:, None], other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=in_q[:, None],
                         other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            q_limit = tl.load(Q_limit + offs_m, mask=in_q, other=-1)
            q_doc = tl.load(Q_doc + offs_m, mask=in_q, other=-1)
            tau = tl.load(Tau + rows, mask=in_q, other=float("inf"))
            delta = tl.load(Delta + rows, mask=in_q, other=0.0)
            if IEEE:
                zt = tl.dot(k, tl.trans(q), input_precision="ieee")
                gt = tl.dot(v, tl.trans(do), input_precision="ieee")
            else:
                zt = tl.dot(k, tl.trans(q))
                gt = tl.dot(v, tl.trans(do))
            visible = (k_pos[:, None] <= q_limit[None, :]) & (k_doc[:, None] == q_doc[None, :])
            visible = visible & in_k[:, None] & in_q[None, :]
            zt = tl.where(visible, zt * scale_z, float("-inf"))
            gap = tl.maximum(zt - tau[None, :], 0.0)
            pt, ut = entmax_weights(gap, gamma, ALPHA_MODE)
            dst = ut * (gt - delta[None, :])
            pt = pt.to(in_dtype)
            dst = dst.to(in_dtype)
            if DOT_F32:
                pt = pt.to(tl.float32)
                dst = dst.to(tl.float32)
            if IEEE:
                dv += tl.dot(pt, do, input_precision="ieee")
                dk += tl.dot(dst, q, input_precision="ieee")
            else:
                dv += tl.dot(pt, do)
                dk += tl.dot(dst, q)

    out_offs = b.to(tl.int64) * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK + out_offs, dk * softmax_scale, mask=in_k[:, None])
    tl.store(DV + out_offs, dv, mask=in_k[:, None])


@triton.jit
def dq_kernel(
    Q, K, V, DO, Q_limit, Q_doc, K_pos, K_doc, Tile_count, Tile_index, Tau, Out_u, U_sum, Delta, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z, softmax_scale, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALPHA_MODE: tl.constexpr, COMPUTE_DELTA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
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
    DO = DO + b.to(tl.int64) * stride_dob + h * stride_doh
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    V = V + b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=in_q[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=in_q[:, None], other=0.0)
    in_dtype = q.dtype
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    q_limit = tl.load(Q_limit + offs_m, mask=in_q, other=-1)
    q_doc = tl.load(Q_doc + offs_m, mask=in_q, other=-1)
    tau = tl.load(Tau + rows, mask=in_q, other=float("inf"))
    if COMPUTE_DELTA:
        out_u = tl.load(Out_u + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
                        + offs_d[None, :] * stride_od, mask=in_q[:, None], other=0.0)
        u_sum = tl.load(U_sum + rows, mask=in_q, other=0.0)
        dot = tl.reduce(do.to(tl.float32) * out_u, 1, ADD)
        delta = tl.where(u_sum > 0, dot / tl.maximum(u_sum, 1e-30), 0.0)
        tl.store(Delta + rows, delta, mask=in_q)
    else:
        delta = tl.load(Delta + rows, mask=in_q, other=0.0)

    list_id = bh * tl.num_programs(0) + tile_q
    count = tl.load(Tile_count + list_id)
    Tile_index = Tile_index + list_id.to(tl.int64) * num_k_tiles

    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        in_k = offs_n < seqlen_k
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=in_k[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=in_k[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            z = tl.dot(q, tl.trans(k), input_precision="ieee")
            g = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            z = tl.dot(q, tl.trans(k))
            g = tl.dot(do, tl.trans(v))
        k_pos = tl.load(K_pos + offs_n, mask=in_k, other=0)
        k_doc = tl.load(K_doc + offs_n, mask=in_k, other=0)
        visible = (k_pos[None, :] <= q_limit[:, None]) & (q_doc[:, None] == k_doc[None, :])
        visible = visible & in_k[None, :] & in_q[:, None]
        z = tl.where(visible, z * scale_z, float("-inf"))
        gap = tl.maximum(z - tau[:, None], 0.0)
        p, u = entmax_weights(gap, gamma, ALPHA_MODE)
        ds = (u * (g - delta[:, None])).to(in_dtype)
        if DOT_F32:
            ds = ds.to(tl.float32)
        if IEEE:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds, k)

    Out = DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(Out, dq * softmax_scale, mask=in_q[:, None])
