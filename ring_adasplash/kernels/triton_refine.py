"""Sums near the row max / tau, over the listed key tiles of each query tile.

One program per (query tile, batch x query head); it visits only the key tiles listed for it
(``Tile_index[:Tile_count]``). Three modes (``MODE``):

    COARSE  coarse histogram of the statistics pass, ``Target`` = K = floor(row max (NB - 1)):
            count, sum u, sum u^2 of the keys in local bin K - floor(z (NB - 1)) < ``Bins``
            (``stats.kept_bins``: NB, or fewer above a tau floor), with
            u = z (NB - 1) - floor(z (NB - 1)) (``torch_blockwise.histogram_pass``)
    FINE    fine histogram of the keys in absolute coarse bin ``Target``: FINE_BINS sub-bins,
            count, sum v, sum v^2 with v the position inside the sub-bin (``refine_pass``); and
            ``Keep[tile]``: the tile has a key no more than one bin below that bin
    NEWTON  sum (z - t)_+^gamma and sum (z - t)_+^(gamma - 1) at t = ``Target`` (``refine_pass``)

Histograms are added into ``Out`` (zeroed by the launcher; each row belongs to one program, so
nothing contends across programs). A tile with at most ``ROW_SCATTER_KEYS`` kept keys adds them
one bin per row at a time (``add_moments_by_row``: row sums, then 3 atomics per row); a fuller
tile adds them one atomic per key (``scatter_moments``). An atomic of a (BLOCK_M, BLOCK_N) tensor
issues an instruction per element, masked or not, so on sparse tiles the row form wins: one H100,
32K tokens, D 64, bf16, causal, 83% block sparsity: coarse pass 12.4 against 15.5 ms, fine pass
5.6 against 6.4 ms. At 25% block sparsity most tiles still pass the kept-key test but spread
their keys over many bins per row, and the per-key form alone would be faster there (coarse
pass 37.6 against 47.7 ms): a switch on the bins per row rather than the keys is left open.
The coarse pass also writes ``Keep[tile]``: whether some row has a key in its own kept bins;
tiles without one hold only keys with z < row max - 1 <= tau.
"""
import triton
import triton.language as tl

from .triton_stats import ADD, MAX, MIN, query_tile, tile_logits


@triton.jit
def scatter_moments(Out, rows, slot, v, keep, NB: tl.constexpr):
    """Out[row, :, slot] += (1, v, v^2) for every kept key, one atomic per key; Out is (rows, 3, NB)."""
    Slot = Out + rows[:, None] * (3 * NB) + tl.where(keep, slot, 0.0).to(tl.int32)
    tl.atomic_add(Slot, tl.where(keep, 1.0, 0.0), mask=keep, sem="relaxed")
    tl.atomic_add(Slot + NB, v, mask=keep, sem="relaxed")
    tl.atomic_add(Slot + 2 * NB, v * v, mask=keep, sem="relaxed")


@triton.jit
def add_moments_by_row(Out, rows, slot, v, keep, NB: tl.constexpr):
    """Out[row, :, slot] += (1, v, v^2) for every kept key, one bin of every row at a time: a
    row's kept keys of one tile fall in one or two bins, so this takes a pass or two of row sums
    and 3 atomics per row, where one atomic per key issues 3 x BLOCK_M x BLOCK_N of them (masked
    or not). Out is (rows, 3, NB); slot (float, integral) and v are (BLOCK_M, BLOCK_N)."""
    Row = Out + rows * (3 * NB)
    bin_now = tl.reduce(tl.where(keep, slot, NB), 1, MIN)
    while tl.reduce(bin_now, 0, MIN) < NB:
        here = keep & (slot == bin_now[:, None])
        count = tl.reduce(here.to(tl.float32), 1, ADD)
        sum_v = tl.reduce(tl.where(here, v, 0.0), 1, ADD)
        sum_v2 = tl.reduce(tl.where(here, v * v, 0.0), 1, ADD)
        has = bin_now < NB
        At = Row + tl.where(has, bin_now, 0.0).to(tl.int32)
        tl.atomic_add(At, count, mask=has, sem="relaxed")
        tl.atomic_add(At + NB, sum_v, mask=has, sem="relaxed")
        tl.atomic_add(At + 2 * NB, sum_v2, mask=has, sem="relaxed")
        keep = keep & (slot != bin_now[:, None])
        bin_now = tl.reduce(tl.where(keep, slot, NB), 1, MIN)


@triton.jit
def add_moments(Out, rows, slot, v, keep, kept, NB: tl.constexpr, ROW_SCATTER_KEYS: tl.constexpr):
    """Out[row, :, slot] += (1, v, v^2) for the ``kept`` kept keys of a tile, in the form that
    suits their number (see the module doc)."""
    if kept <= ROW_SCATTER_KEYS:
        add_moments_by_row(Out, rows, slot, v, keep, NB)
    else:
        scatter_moments(Out, rows, slot, v, keep, NB)


@triton.jit
def refine_kernel(
    Q, K, Q_limit, Q_doc, K_pos, K_doc, K_full_lo, K_full_hi, Tile_count, Tile_index, Target, Bins, Out, Keep,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_BINS: tl.constexpr, FINE_BINS: tl.constexpr, MODE: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, ROW_SCATTER_KEYS: tl.constexpr = 128,
):
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, DOT_F32)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    target = tl.load(Target + rows, mask=in_q, other=0.0)
    if MODE == 0:
        bins = tl.load(Bins + rows, mask=in_q, other=0.0)  # local bins kept, from bin 0 down

    list_id = bh * tl.num_programs(0) + tile_q
    count = tl.load(Tile_count + list_id)
    Tile_index = Tile_index + list_id.to(tl.int64) * num_k_tiles

    full_lo = tl.load(K_full_lo + tile_q)  # key tiles [full_lo, full_hi) need no visibility mask
    full_hi = tl.load(K_full_hi + tile_q)
    f_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    df_sum = tl.full([BLOCK_M], 0.0, tl.float32)

    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, scale_z, (tile_k >= full_lo) & (tile_k < full_hi), DOT_F32, IEEE)
        if MODE == 2:  # Newton sums
            gap = tl.maximum(z - target[:, None], 0.0)
            log_gap = tl.log2(tl.where(gap > 0, gap, 1.0))
            f_sum += tl.reduce(tl.where(gap > 0, tl.exp2(gamma * log_gap), 0.0), 1, ADD)
            df_sum += tl.reduce(tl.where(gap > 0, tl.exp2((gamma - 1.0) * log_gap), 0.0), 1, ADD)
        else:
            scaled = z * (NUM_BINS - 1)
            idx = tl.floor(scaled)
            if MODE == 0:  # coarse: local bins below the reference K (invisible pairs: idx = -inf)
                # (at least 0: should a recomputed logit round above its row max, it stays in bin 0)
                local = tl.maximum(target[:, None] - idx, 0.0)
                keep = local < bins[:, None]
                kept = tl.reduce(tl.reduce(keep.to(tl.int32), 1, ADD), 0, ADD)
                if kept > 0:
                    # some row has a key within its NUM_BINS bins: the tile may hold p > 0
                    tl.store(Keep + list_id.to(tl.int64) * num_k_tiles + tile_k, 1)
                    add_moments(Out, rows, local, scaled - idx, keep, kept, NUM_BINS, ROW_SCATTER_KEYS)
            else:  # fine: sub-bins of the coarse bin of tau
                # the tile stays in the block mask only if some row has a key at most one bin
                # below the bin of tau (tau lies inside that bin, so lower keys have p = 0)
                near = (idx >= target[:, None] - 1.0).to(tl.int32)
                tl.store(Keep + list_id.to(tl.int64) * num_k_tiles + tile_k,
                         tl.reduce(tl.reduce(near, 1, MAX), 0, MAX).to(tl.int8))
                keep = idx == target[:, None]
                kept = tl.reduce(tl.reduce(keep.to(tl.int32), 1, ADD), 0, ADD)
                if kept > 0:
                    frac = tl.where(keep, (scaled - idx) * FINE_BINS, 0.0)
                    sub = tl.minimum(tl.maximum(tl.floor(frac), 0.0), FINE_BINS - 1)
                    add_moments(Out, rows, sub, frac - sub, keep, kept, FINE_BINS, ROW_SCATTER_KEYS)

    if MODE == 2:
        tl.store(Out + rows * 2, f_sum, mask=in_q)
        tl.store(Out + rows * 2 + 1, df_sum, mask=in_q)
