"""Statistics pass (the only dense Q.K^T pass): row max, coarse histogram and per-tile maxima.

One program per (query tile, batch x query head). It walks the visible key tiles from the last to
the first (causal rows meet their largest logits near the diagonal first, so the running reference
settles early and far tiles skip the histogram work), and keeps per row

    m        running max of z = scale_z * q . k over visible keys
    ref      K = floor(m * (NUM_BINS - 1)), the reference of the local bins
    hist     count, sum u, sum u^2 of the keys in local bin b = K - floor(z (NUM_BINS - 1)) < NUM_BINS

exactly as ``torch_blockwise.stats_pass`` (see ``stats.py`` for the definitions).
"""
import triton
import triton.language as tl

# Reductions: ``tl.reduce(x, axis, ADD)`` is ``tl.sum(x, axis)`` and ``tl.reduce(x, axis, MAX)`` is
# ``tl.max(x, axis)`` once compiled. tl.sum and tl.max are @jit wrappers, and the interpreter
# (TRITON_INTERPRET=1) re-patches the language on every @jit call, milliseconds each; called with
# the standard combine functions, tl.reduce runs as one numpy reduction there. For the same reason
# (and because @jit helpers of triton.language imported without TRITON_INTERPRET cannot be called
# from interpreted kernels) the kernels use tl.full, not tl.zeros.
ADD = tl.standard._sum_combine
MAX = tl.standard._elementwise_max


@triton.jit
def key_tile_visible(Q_tiles, K_tiles, tile_q, tile_k):
    """Whether (tile_q, tile_k) may hold a visible pair (see ``visibility.tile_bounds``)."""
    q_limit_max = tl.load(Q_tiles + tile_q * 3)
    q_doc_min = tl.load(Q_tiles + tile_q * 3 + 1)
    q_doc_max = tl.load(Q_tiles + tile_q * 3 + 2)
    k_pos_min = tl.load(K_tiles + tile_k * 3)
    k_doc_min = tl.load(K_tiles + tile_k * 3 + 1)
    k_doc_max = tl.load(K_tiles + tile_k * 3 + 2)
    return (k_pos_min <= q_limit_max) & (k_doc_min <= q_doc_max) & (q_doc_min <= k_doc_max)


@triton.jit
def masked_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                  stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z,
                  DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """z (BLOCK_M, BLOCK_N) fp32 of one key tile, -inf where a pair is not visible."""
    in_k = offs_n < seqlen_k
    k = tl.load(K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=in_k[None, :], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    k_pos = tl.load(K_pos + offs_n, mask=in_k, other=0)
    k_doc = tl.load(K_doc + offs_n, mask=in_k, other=0)
    visible = (k_pos[None, :] <= q_limit[:, None]) & (q_doc[:, None] == k_doc[None, :])
    visible = visible & in_k[None, :] & (offs_m < seqlen_q)[:, None]
    return tl.where(visible, qk * scale_z, float("-inf"))


@triton.jit
def stats_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, Q_tiles, K_tiles,
    Row_max, Hist, Tile_max,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    tile_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    num_q_tiles = tl.num_programs(0)
    offs_m = tile_q * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    bins = tl.arange(0, NUM_BINS)
    in_q = offs_m < seqlen_q

    Q = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=in_q[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_limit = tl.load(Q_limit + offs_m, mask=in_q, other=-1)
    q_doc = tl.load(Q_doc + offs_m, mask=in_q, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ref = tl.full([BLOCK_M], -1e9, tl.float32)  # K of an empty row, as bin_reference
    hist_c = tl.full([BLOCK_M, NUM_BINS], 0.0, tl.float32)
    hist_1 = tl.full([BLOCK_M, NUM_BINS], 0.0, tl.float32)
    hist_2 = tl.full([BLOCK_M, NUM_BINS], 0.0, tl.float32)
    Tile_max = Tile_max + (bh * num_q_tiles + tile_q).to(tl.int64) * num_k_tiles

    for step in range(0, num_k_tiles):
        tile_k = num_k_tiles - 1 - step
        if key_tile_visible(Q_tiles, K_tiles, tile_q, tile_k):
            offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
            z = masked_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                              stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, DOT_F32, IEEE)
            z_max = tl.reduce(z, 1, MAX)
            tl.store(Tile_max + tile_k, tl.reduce(z_max, 0, MAX))
            m_new = tl.maximum(m_i, z_max)
            ref_new = tl.where(m_new > float("-inf"), tl.floor(m_new * (NUM_BINS - 1)), -1e9)
            # a row keeps keys with local bin K - floor(z (NB - 1)) < NB; the tile max decides for the tile
            reach = ref_new - tl.floor(z_max * (NUM_BINS - 1))
            if tl.reduce((reach < NUM_BINS).to(tl.int32), 0, MAX) > 0:
                # re-reference the bins kept so far: local bin b moves to b + (K_new - K_old)
                shift = tl.minimum(ref_new - ref, NUM_BINS).to(tl.int32)
                source = bins[None, :] - shift[:, None]
                moved = source >= 0
                source = tl.maximum(source, 0)
                hist_c = tl.where(moved, tl.gather(hist_c, source, 1), 0.0)
                hist_1 = tl.where(moved, tl.gather(hist_1, source, 1), 0.0)
                hist_2 = tl.where(moved, tl.gather(hist_2, source, 1), 0.0)
                scaled = z * (NUM_BINS - 1)
                idx = tl.floor(scaled)
                local = ref_new[:, None] - idx  # +inf for invisible pairs
                keep = local < NUM_BINS
                u = tl.where(keep, scaled - idx, 0.0)
                u2 = u * u
                for j in tl.static_range(NUM_BINS):
                    here = local == j
                    column = bins[None, :] == j
                    hist_c += tl.where(column, tl.reduce(here.to(tl.float32), 1, ADD)[:, None], 0.0)
                    hist_1 += tl.where(column, tl.reduce(tl.where(here, u, 0.0), 1, ADD)[:, None], 0.0)
                    hist_2 += tl.where(column, tl.reduce(tl.where(here, u2, 0.0), 1, ADD)[:, None], 0.0)
                m_i = m_new
                ref = ref_new

    rows = bh.to(tl.int64) * seqlen_q + offs_m
    tl.store(Row_max + rows, m_i, mask=in_q)
    Hist = Hist + rows[:, None] * (3 * NUM_BINS) + bins[None, :]
    tl.store(Hist, hist_c, mask=in_q[:, None])
    tl.store(Hist + NUM_BINS, hist_1, mask=in_q[:, None])
    tl.store(Hist + 2 * NUM_BINS, hist_2, mask=in_q[:, None])
