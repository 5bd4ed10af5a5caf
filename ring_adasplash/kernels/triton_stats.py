"""Statistics pass, dense part (the only dense Q.K^T sweep): row max, tau floor, per-tile gaps.

One program per (query tile, batch x query head). ``tau_floor_kernel`` first takes a *tau floor*
per row: the tau of the row's keys in the last two key tiles of its span (causal: the diagonal and
the tile before), by Newton steps from below; any subset of the keys has a smaller tau, so this
bounds tau from below. ``stats_kernel`` then walks every key tile that may hold a visible key,
nearest first, keeping the running max of ``z = scale_z * q . k`` per row, and per tile writes
the *gap*: max over the tile's rows of (the row's largest z in the tile - max(tau floor, running
max - 1)). That reference is a lower bound of tau (no p exceeds 1, so tau >= max - 1) that only
grows along the sweep, so a gap bounds from above how far any key of the tile rises over the
final one: every later tile test (``stats.histogram_mask``, ``algorithm.lower_bound_mask``)
compares gaps with per-row thresholds relative to it. Where the probability mass sits near the
diagonal (tau well above max - 1), the floor keeps the histogram off the tiles whose keys only
reach within one of the max.

The coarse histogram (keys per local bin ``K - floor(z (NB - 1))``, ``K = floor(row max (NB -
1))``, see ``stats.py``) is then taken by ``triton_refine.histogram_kernel`` over only the tiles
that reach the bin of some row's lower bound: with
the final row max known there is nothing to shift, and the dense sweep stays a plain max. (Keeping
the histogram in this loop, behind a runtime branch that re-references it as the running max
grows, measured 3.4x slower on an H100 at 16K, D = 128, even with the branch never taken.)

Shared helpers for the other kernels live here too.
"""
import triton
import triton.language as tl

# Reductions: ``tl.reduce(x, axis, ADD)`` is ``tl.sum(x, axis)`` and ``tl.reduce(x, axis, MAX)`` is
# ``tl.max(x, axis)`` once compiled (MIN likewise). tl.sum and tl.max are @jit wrappers, and the interpreter
# (TRITON_INTERPRET=1) re-patches the language on every @jit call, milliseconds each; called with
# the standard combine functions, tl.reduce runs as one numpy reduction there. For the same reason
# (and because @jit helpers of triton.language imported without TRITON_INTERPRET cannot be called
# from interpreted kernels) the kernels use tl.full, not tl.zeros.
ADD = tl.standard._sum_combine
MAX = tl.standard._elementwise_max
MIN = tl.standard._elementwise_min


@triton.jit
def query_tile(Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr):
    """This program's query tile, for the kernels with one program per (query tile, batch x query
    head): ``(tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc)``; q in float32 when ``DOT_F32``."""
    tile_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = tile_q * BLOCK_M + tl.arange(0, BLOCK_M)
    in_q = offs_m < seqlen_q
    Q = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    q = tl.load(Q + offs_m[:, None] * stride_qs + tl.arange(0, HEAD_DIM)[None, :] * stride_qd, mask=in_q[:, None],
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_limit = tl.load(Q_limit + offs_m, mask=in_q, other=-1)
    q_doc = tl.load(Q_doc + offs_m, mask=in_q, other=-1)
    return tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc


@triton.jit
def listed_tiles(Tile_count, Tile_index, K_full_lo, K_full_hi, tile_q, bh, num_k_tiles):
    """The key tiles listed for this program's query tile (lists of ``num_k_tiles`` slots, one per
    (batch x query head, query tile)): ``(count, Tile_index, tile_row, full_lo, full_hi)``, the
    list's length and start, the offset of this query tile's row in per-tile outputs, and the
    run [full_lo, full_hi) of key tiles whose every pair is visible (no per-element mask)."""
    list_id = bh * tl.num_programs(0) + tile_q
    tile_row = list_id.to(tl.int64) * num_k_tiles
    count = tl.load(Tile_count + list_id)
    full_lo = tl.load(K_full_lo + tile_q)
    full_hi = tl.load(K_full_hi + tile_q)
    return count, Tile_index + tile_row, tile_row, full_lo, full_hi


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
def tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, full,
                DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """z (BLOCK_M, BLOCK_N) fp32 of one key tile: ``full`` when every pair of the tile is visible
    (no position loads, no mask: most tiles of a causal layout), else ``masked_logits``."""
    if full:
        k = tl.load(K + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)
        if DOT_F32:
            k = k.to(tl.float32)
        if IEEE:
            z = tl.dot(q, k, input_precision="ieee") * scale_z
        else:
            z = tl.dot(q, k) * scale_z
    else:
        z = masked_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                          stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, DOT_F32, IEEE)
    return z


@triton.jit
def power_and_slope(d, gamma, POWER: tl.constexpr):
    """(d ** gamma, d ** (gamma - 1)) for d >= 0: ``POWER`` is gamma when gamma is 1 or 2, else 0."""
    if POWER == 1:
        return d, tl.where(d > 0, 1.0, 0.0)
    elif POWER == 2:
        return d * d, d
    else:
        slope = tl.where(d > 0, tl.exp2((gamma - 1.0) * tl.log2(tl.where(d > 0, d, 1.0))), 0.0)
        return d * slope, slope


@triton.jit
def nearest_tau_floor(z_near, z_next, gamma, POWER: tl.constexpr, STEPS: tl.constexpr, MARGIN: tl.constexpr):
    """Per row, a lower bound of tau from the keys of two tiles (``torch_blockwise.nearest_tau_floor``):
    Newton steps on ``f(t) = sum (z - t)_+^gamma = 1`` from ``max - 1``; f is convex and decreasing,
    so each step stays below the root. -inf for rows with no visible key there."""
    top = tl.maximum(tl.reduce(z_near, 1, MAX), tl.reduce(z_next, 1, MAX))
    has = top > float("-inf")
    t = tl.where(has, top, 0.0) - 1.0
    for _ in range(0, STEPS):
        f_near, slope_near = power_and_slope(tl.maximum(z_near - t[:, None], 0.0), gamma, POWER)
        f_next, slope_next = power_and_slope(tl.maximum(z_next - t[:, None], 0.0), gamma, POWER)
        f = tl.reduce(f_near, 1, ADD) + tl.reduce(f_next, 1, ADD)
        slope = tl.reduce(slope_near, 1, ADD) + tl.reduce(slope_next, 1, ADD)
        t += (f - 1.0) / tl.maximum(gamma * slope, 1e-30)
    return tl.where(has, t - MARGIN, float("-inf"))


@triton.jit
def tau_floor_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, K_tile_lo, K_tile_hi, Tau_floor,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, STEPS: tl.constexpr, MARGIN: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    """Tau floor of every row (``stats.Maxima``) from the last two key tiles of its query tile's
    span (causal: the diagonal and the tile before). Its own launch, not a prologue of
    ``stats_kernel``: two live (BLOCK_M, BLOCK_N) tiles there cost the dense sweep registers,
    occupancy and about 10% of its time (one H200, 32K tokens, D 64)."""
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, DOT_F32)
    offs_d = tl.arange(0, HEAD_DIM)
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    lo = tl.load(K_tile_lo + tile_q)
    hi = tl.load(K_tile_hi + tile_q)
    # a tile outside [lo, hi) is read at tile 0 and counts as all invisible
    offs_n = tl.maximum(hi - 1, 0) * BLOCK_N + tl.arange(0, BLOCK_N)
    z_near = masked_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                           stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, DOT_F32, IEEE)
    z_near = tl.where(hi - 1 >= lo, z_near, float("-inf"))
    offs_n = tl.maximum(hi - 2, 0) * BLOCK_N + tl.arange(0, BLOCK_N)
    z_next = masked_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d,
                           stride_ks, stride_kd, seqlen_q, seqlen_k, scale_z, DOT_F32, IEEE)
    z_next = tl.where(hi - 2 >= lo, z_next, float("-inf"))
    tau_floor = nearest_tau_floor(z_near, z_next, gamma, POWER, STEPS, MARGIN)
    tl.store(Tau_floor + bh.to(tl.int64) * seqlen_q + offs_m, tau_floor, mask=in_q)


@triton.jit
def stats_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, K_tile_lo, K_tile_hi, K_full_lo, K_full_hi, Row_max, Tau_floor, Tile_gap,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROW_MAX: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):
    """Dense sweep, nearest key tiles first: running row max of z over visible keys (starting from
    ``Row_max`` when ``HAS_ROW_MAX``, updated in place) and the gap of every (query tile, key
    tile): max over the tile's rows of (the row's largest z in the tile - max(tau floor, running
    max - 1)) (``stats.Maxima``, ``stats.tau_low``; ``Tau_floor`` from ``tau_floor_kernel``)."""
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, DOT_F32)
    offs_d = tl.arange(0, HEAD_DIM)
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    Tile_gap = Tile_gap + (bh * tl.num_programs(0) + tile_q).to(tl.int64) * num_k_tiles
    Row_max = Row_max + bh.to(tl.int64) * seqlen_q + offs_m
    tau_floor = tl.load(Tau_floor + bh.to(tl.int64) * seqlen_q + offs_m, mask=in_q, other=float("-inf"))

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
    # close to the final one early, and the gaps of the far tiles come out tight
    for step in range(0, hi - lo):
        tile_k = hi - 1 - step
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, scale_z, (tile_k >= full_lo) & (tile_k < full_hi), DOT_F32, IEEE)
        z_max = tl.reduce(z, 1, MAX)
        m_i = tl.maximum(m_i, z_max)
        gap = tl.where(z_max > float("-inf"), z_max - tl.maximum(tau_floor, m_i - 1.0), float("-inf"))
        tl.store(Tile_gap + tile_k, tl.reduce(gap, 0, MAX))

    tl.store(Row_max, m_i, mask=in_q)
