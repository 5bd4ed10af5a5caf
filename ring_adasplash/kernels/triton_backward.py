"""Backward pass over the nonzero tiles: a dK/dV kernel and a dQ kernel, no atomics.

With ``gap = (z - tau)_+`` (z relative to the row's score max, ``Shift``), ``p = gap^gamma``,
``u = gap^(gamma - 1)``, ``g = dO . v`` and the row term ``delta``:
ds = u (g - delta),  dq = scale ds k,  dk = scale ds^T q,  dv = p^T dO.
Rows whose tau is NaN (they see a score that is not finite) get NaN dq, and the keys they see
NaN dk and dv, as in dense attention: ``nan_keys_kernel`` marks those keys in ``Nan_keys`` (a
program with such a row walks its span of key tiles; the others read their tau and stop) and the
dK/dV kernel reads the marks.

``dkdv_kernel``: one program per (key tile, batch x key head); it loops over the GROUP query heads
that share the key head and, for each, over the query tiles listed as nonzero for this key tile.
``dq_kernel``: one program per (query tile, batch x query head), over its nonzero key tiles. With
``COMPUTE_DELTA`` it first computes its rows' ``delta = (dO . sum u v) / sum u`` (0 where
sum u = 0) from the dO tile it loads anyway, and stores it for the dK/dV kernel launched after
(why: docs/design.md (kernel choices)).
Operands meet in the input dtype (P and dS cast, as flash attention does) with fp32 accumulation.
"""

import triton
import triton.language as tl

from .triton_common import (ADD, LN2, MAX, at_head, copy_power, dot, entmax_weights, first_slot_at_least, form_copies,
                            hide_invisible, key_positions, list_slot, list_slots, listed_query_tile, listed_tile,
                            listed_tiles, load_rows, logits, of_query_head, offset_strides, positive_gap,
                            program_query_flag, program_tile, query_positions, row_offsets, runs_form, slope_and_log2,
                            tile_ptrs, visible)



@triton.jit
def dkdv_tiles(k, v, Qh, DOh, Q_limit, Q_doc, Q_first, k_pos, k_doc, k_win_pos, in_k, Index, count, full_first,
               full_end, Shift, Tau, Delta, bh, dk, dv, stride_qs, stride_qd, stride_dos, stride_dod, seqlen_q,
               scale_z, gamma, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, POWER: tl.constexpr,
               FULL: tl.constexpr, Q_STEP: tl.constexpr, PRECISION: tl.constexpr):
    """``dk`` and ``dv`` plus the sums over one of the two loops of listed query tiles
    (``list_slots``; with ``FULL``, the query tiles that see every key of this tile), ``Q_STEP``
    of a tile's rows at a time (the (keys, rows) float32 tiles of a step live in registers beside
    the two (keys, HEAD_DIM) accumulators)."""
    tl.static_assert(BLOCK_M % Q_STEP == 0)
    start, stop = list_slots(count, full_first, full_end, FULL)
    for i in range(start, stop):
        tile_m = listed_tile(Index, list_slot(i, full_first, full_end, FULL)) * BLOCK_M
        for part in tl.static_range(BLOCK_M // Q_STEP):
            start_m = tile_m + part * Q_STEP
            offs_m = start_m + tl.arange(0, Q_STEP)
            in_q = offs_m < seqlen_q
            rows = row_offsets(bh, seqlen_q, offs_m)
            q = load_rows(Qh, start_m, in_q, stride_qs, stride_qd, Q_STEP, HEAD_DIM)
            do = load_rows(DOh, start_m, in_q, stride_dos, stride_dod, Q_STEP, HEAD_DIM)
            shift = tl.load(Shift + rows, mask=in_q, other=0.0)
            tau = tl.load(Tau + rows, mask=in_q, other=float("inf"))
            delta = tl.load(Delta + rows, mask=in_q, other=0.0)
            zt = logits(dot(k, tl.trans(q), PRECISION), shift[None, :], scale_z)
            gt = dot(v, tl.trans(do), PRECISION)
            if not FULL:
                q_limit, q_doc, q_first = query_positions(Q_limit, Q_doc, Q_first, offs_m, in_q)
                pairs = visible(q_limit[None, :], q_doc[None, :], q_first[None, :], in_q[None, :], k_pos[:, None],
                                k_doc[:, None], k_win_pos[:, None], in_k[:, None])
                zt = tl.where(pairs, zt, float("-inf"))
            pt, ut = entmax_weights(positive_gap(zt, tau[None, :]), gamma, POWER)
            dst = ut * (gt - delta[None, :])
            dv += dot(pt.to(k.dtype), do, PRECISION)
            dk += dot(dst.to(k.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, Q_full_lo, Q_full_hi, Tile_count, Tile_index,
    Shift, Tau, Delta, Nan_keys, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    seqlen_q, seqlen_k, num_heads, num_heads_kv, num_q_tiles, list_width, scale_z, softmax_scale, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, Q_STEP: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    stride_vs, stride_vh = offset_strides(stride_vs, stride_vh, WIDE_OFFSETS)
    stride_dos, stride_doh = offset_strides(stride_dos, stride_doh, WIDE_OFFSETS)
    stride_dks, stride_dkh = offset_strides(stride_dks, stride_dkh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tile_k, bhk, b, hk, offs_n, in_k = program_tile(num_heads_kv, seqlen_k, BLOCK_N)
    k = load_rows(at_head(K, b, hk, stride_kb, stride_kh), tile_k * BLOCK_N, in_k, stride_ks, stride_kd, BLOCK_N,
                  HEAD_DIM)
    v = load_rows(at_head(V, b, hk, stride_vb, stride_vh), tile_k * BLOCK_N, in_k, stride_vs, stride_vd, BLOCK_N,
                  HEAD_DIM)
    k_pos, k_doc, k_win_pos = key_positions(K_pos, K_doc, K_win_pos, offs_n, in_k)
    q_full_lo = tl.load(Q_full_lo + tile_k)
    q_full_hi = tl.load(Q_full_hi + tile_k)

    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * num_heads + h
        Qh = at_head(Q, b, h, stride_qb, stride_qh)
        DOh = at_head(DO, b, h, stride_dob, stride_doh)
        count, Index, _ = listed_tiles(Tile_count, Tile_index, tile_k, bh, num_q_tiles, list_width)
        # the list is ascending, so the query tiles that see this key tile whole are consecutive
        full_first = first_slot_at_least(Index, count, q_full_lo)
        full_end = tl.maximum(first_slot_at_least(Index, count, q_full_hi), full_first)
        scale_z_h, gamma_h = of_query_head(scale_z, h, PER_HEAD), of_query_head(gamma, h, PER_HEAD)
        for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
            for FORM in tl.static_range(form_copies(POWER)):  # triton_common.runs_form
                if runs_form(gamma_h, FORM, POWER):
                    dk, dv = dkdv_tiles(k, v, Qh, DOh, Q_limit, Q_doc, Q_first, k_pos, k_doc, k_win_pos, in_k, Index,
                                        count, full_first, full_end, Shift, Tau, Delta, bh, dk, dv, stride_qs,
                                        stride_qd, stride_dos, stride_dod, seqlen_q, scale_z_h, gamma_h, BLOCK_M,
                                        HEAD_DIM, copy_power(POWER, FORM), FULL,
                                        Q_STEP, PRECISION)

    # keys that a row with a non-finite score sees (Nan_keys (B, Sk, Hkv) int8): NaN, as in dense attention
    nan_key = tl.load(Nan_keys + (b * seqlen_k + offs_n).to(tl.int64) * num_heads_kv + hk, mask=in_k, other=0) != 0
    dk = tl.where(nan_key[:, None], float("nan"), dk * softmax_scale)
    dv = tl.where(nan_key[:, None], float("nan"), dv)
    DK = tile_ptrs(at_head(DK, b, hk, stride_dkb, stride_dkh), tile_k * BLOCK_N, stride_dks, stride_dkd, BLOCK_N,
                   HEAD_DIM)
    DV = tile_ptrs(at_head(DV, b, hk, stride_dkb, stride_dkh), tile_k * BLOCK_N, stride_dks, stride_dkd, BLOCK_N,
                   HEAD_DIM)
    tl.store(DK, dk, mask=in_k[:, None])
    tl.store(DV, dv, mask=in_k[:, None])


@triton.jit
def row_delta(Out_u, U_sum, do, b, h, start_m, in_q, rows, stride_ob, stride_os, stride_oh, stride_od,
              BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = (dO . sum u v) / sum u of the rows ``start_m`` to ``start_m + BLOCK_M - 1``
    (``torch_blockwise.row_delta``)."""
    out_u = load_rows(at_head(Out_u, b, h, stride_ob, stride_oh), start_m, in_q, stride_os, stride_od, BLOCK_M,
                      HEAD_DIM)
    u_sum = tl.load(U_sum + rows, mask=in_q, other=0.0)
    dot_ = tl.reduce(do.to(tl.float32) * out_u.to(tl.float32), 1, ADD)
    return tl.where(u_sum > 0, dot_ / tl.maximum(u_sum, 1e-30), 0.0)


@triton.jit
def dq_tiles(q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first, in_q,
             do, shift, tau, delta, dq, alpha_sum, stride_ks, stride_kd, stride_vs, stride_vd, seqlen_k,
             scale_z, gamma, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, POWER: tl.constexpr, FULL: tl.constexpr,
             ALPHA_SUMS: tl.constexpr, PRECISION: tl.constexpr):
    """``dq`` plus the sum over one of the two loops of listed key tiles (``list_slots``); with
    ``ALPHA_SUMS``, the row sum of ``EntmaxSpec.alpha_terms`` too."""
    start, stop = list_slots(count, full_first, full_end, FULL)
    for j in range(start, stop):
        tile_k = listed_tile(Tile_index, list_slot(j, full_first, full_end, FULL))
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        in_k = offs_n < seqlen_k
        k = load_rows(K, tile_k * BLOCK_N, in_k, stride_ks, stride_kd, BLOCK_N, HEAD_DIM)
        v = load_rows(V, tile_k * BLOCK_N, in_k, stride_vs, stride_vd, BLOCK_N, HEAD_DIM)
        z = logits(dot(q, tl.trans(k), PRECISION), shift[:, None], scale_z)
        g = dot(do, tl.trans(v), PRECISION)
        z = hide_invisible(z, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, in_q, offs_n, in_k, FULL)
        gap = positive_gap(z, tau[:, None])
        if ALPHA_SUMS:
            u, log2_gap = slope_and_log2(gap, gamma, POWER)
        else:
            _, u = entmax_weights(gap, gamma, POWER)
        ds = u * (g - delta[:, None])
        if ALPHA_SUMS:  # before the product, so that the float32 ds and gap need not outlive it
            # (g - delta) p (1 - log gap) = ds gap (1 - log gap), 0 off the support (a NaN value reaches no sum);
            # the log of a gap below the smallest normal float (never met: z and tau are of order one)
            # is taken at that float, which moves a term by less than 1e-35
            on = gap > 0
            log_gap = LN2 * log2_gap
            alpha_sum += tl.reduce(tl.where(on, ds * gap * (1.0 - log_gap), 0.0), 1, ADD)
        dq += dot(ds.to(q.dtype), k, PRECISION)
    return dq, alpha_sum


@triton.jit
def dq_sweep(q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
             in_q, do, shift, tau, delta, dq, alpha_sum, stride_ks, stride_kd, stride_vs, stride_vd, seqlen_k,
             scale_z, gamma, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, POWER: tl.constexpr,
             ALPHA_SUMS: tl.constexpr, PRECISION: tl.constexpr):
    """``dq_tiles`` over both loops: the tiles that need a mask, then the others (``list_slots``)."""
    for FULL in tl.static_range(2):
        for FORM in tl.static_range(form_copies(POWER)):  # triton_common.runs_form
            if runs_form(gamma, FORM, POWER):
                dq, alpha_sum = dq_tiles(
                    q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc,
                    q_first, in_q, do, shift, tau, delta, dq, alpha_sum, stride_ks, stride_kd, stride_vs, stride_vd,
                    seqlen_k, scale_z, gamma, BLOCK_N, HEAD_DIM,
                    copy_power(POWER, FORM), FULL == 1, ALPHA_SUMS, PRECISION)
    return dq, alpha_sum


@triton.jit
def nan_keys_kernel(Tau, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_tile_lo, K_tile_hi, Nan_keys,
                    seqlen_q, seqlen_k, num_heads, num_heads_kv, num_q_tiles,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr):
    """Sets ``Nan_keys`` (B, Sk, Hkv) int8, zeros, to 1 at the keys that a row whose tau is NaN
    sees (their dk and dv are NaN, as in dense attention). One program per ``TILES`` query tiles
    of a batch x query head: it reads their tau at once, and only where a row's is NaN (rare)
    walks each such query tile's span of key tiles [K_tile_lo, K_tile_hi). A kernel of its own: in
    the dQ kernel the rare walk cost instructions in its main loops; several query tiles a
    program, so that the usual case is a few programs that read and stop."""
    bh = tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    first = tl.program_id(0) * TILES
    offs = first * BLOCK_M + tl.arange(0, TILES * BLOCK_M)
    tau = tl.load(Tau + row_offsets(bh, seqlen_q, offs), mask=offs < seqlen_q, other=0.0)
    if tl.reduce((tau != tau).to(tl.int32), 0, MAX) > 0:
        for tile_q in range(first, tl.minimum(first + TILES, num_q_tiles)):
            offs_m = tile_q * BLOCK_M + tl.arange(0, BLOCK_M)
            in_q = offs_m < seqlen_q
            nan_row = tl.load(Tau + row_offsets(bh, seqlen_q, offs_m), mask=in_q, other=0.0)
            nan_row = nan_row != nan_row
            q_limit, q_doc, q_first = query_positions(Q_limit, Q_doc, Q_first, offs_m, in_q)
            for tile_k in range(tl.load(K_tile_lo + tile_q), tl.load(K_tile_hi + tile_q)):
                offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
                in_k = offs_n < seqlen_k
                k_pos, k_doc, k_win_pos = key_positions(K_pos, K_doc, K_win_pos, offs_n, in_k)
                pairs = visible(q_limit[:, None], q_doc[:, None], q_first[:, None], nan_row[:, None],
                                k_pos[None, :], k_doc[None, :], k_win_pos[None, :], in_k[None, :])
                seen = tl.reduce(pairs.to(tl.int32), 0, MAX) > 0
                tl.store(Nan_keys + (b * seqlen_k + offs_n).to(tl.int64) * num_heads_kv + h // GROUP,
                         tl.full([BLOCK_N], 1, tl.int8), mask=seen)


# dq_kernel's ALPHA_SPLIT: every query tile; those the forward left open (their alpha sums term
# by term); those it finished (their alpha sums from the forward's)
SPLIT_NONE = tl.constexpr(0)
SPLIT_OPEN = tl.constexpr(1)
SPLIT_FINISHED = tl.constexpr(2)


@triton.jit
def dq_kernel(
    Q, K, V, DO, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Tau, Out_u, U_sum,
    Delta, DQ, Alpha_sums, Out_c, C_sum, Alpha_open,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z, softmax_scale, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, COMPUTE_DELTA: tl.constexpr, ALPHA_SUMS: tl.constexpr, ALPHA_SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """dq of one query tile (module doc); with ``ALPHA_SUMS`` the row sums of
    ``EntmaxSpec.alpha_terms`` into ``Alpha_sums``. ``ALPHA_SPLIT`` (``SPLIT_*``): the program
    runs only on the query tiles that ``Alpha_open`` (int8 per query tile) marks (``SPLIT_OPEN``:
    the sums term by term in the tile loops) or only on the others (``SPLIT_FINISHED``: the sums
    as ``dO . Out_c - delta C_sum`` from the forward's ``triton_candidates.candidate_alpha_sums``,
    ``Out_c`` with ``Out_u``'s strides, and tile loops without them): one launch for each, so
    neither kind's loop is compiled beside the other's."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    stride_vs, stride_vh = offset_strides(stride_vs, stride_vh, WIDE_OFFSETS)
    stride_dos, stride_doh = offset_strides(stride_dos, stride_doh, WIDE_OFFSETS)
    stride_os, stride_oh = offset_strides(stride_os, stride_oh, WIDE_OFFSETS)
    stride_dqs, stride_dqh = offset_strides(stride_dqs, stride_dqh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    # with ALPHA_SPLIT, a launch for each kind of query tile, each compiled for its own loop
    if ALPHA_SPLIT == SPLIT_NONE:
        runs = tl.program_id(0) >= 0
    elif ALPHA_SPLIT == SPLIT_OPEN:
        runs = program_query_flag(Alpha_open) != 0
    else:
        runs = program_query_flag(Alpha_open) == 0
    if runs:
        (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, _, full_first,
         full_end) = listed_query_tile(
            Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
            stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
            GROUP, HEAD_DIM, BLOCK_M)
        scale_z_h = of_query_head(scale_z, h, PER_HEAD)  # new names: a branch may not change a type
        gamma_h = of_query_head(gamma, h, PER_HEAD)
        V = at_head(V, b, h // GROUP, stride_vb, stride_vh)
        do = load_rows(at_head(DO, b, h, stride_dob, stride_doh), tile_q * BLOCK_M, in_q, stride_dos, stride_dod,
                       BLOCK_M, HEAD_DIM)
        shift = tl.load(Shift + rows, mask=in_q, other=0.0)
        tau = tl.load(Tau + rows, mask=in_q, other=float("inf"))
        if COMPUTE_DELTA:
            delta = row_delta(Out_u, U_sum, do, b, h, tile_q * BLOCK_M, in_q, rows, stride_ob, stride_os, stride_oh,
                              stride_od, BLOCK_M, HEAD_DIM)
            tl.store(Delta + rows, delta, mask=in_q)
        else:
            delta = tl.load(Delta + rows, mask=in_q, other=0.0)

        dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
        alpha_sum = tl.full([BLOCK_M], 0.0, tl.float32)
        if ALPHA_SPLIT == SPLIT_FINISHED:
            # before the tile loop, where the row term read dO the same way: taken after it, dO
            # stayed live across the loop in a second layout, and the loops spilled registers
            out_c = load_rows(at_head(Out_c, b, h, stride_ob, stride_oh), tile_q * BLOCK_M, in_q, stride_os, stride_od,
                              BLOCK_M, HEAD_DIM)
            c_sum = tl.load(C_sum + rows, mask=in_q, other=0.0)
            alpha_sum = tl.reduce(do.to(tl.float32) * out_c, 1, ADD) - delta * c_sum
            dq, alpha_sum = dq_sweep(q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end,
                                     q_limit, q_doc, q_first, in_q, do, shift, tau, delta, dq, alpha_sum, stride_ks,
                                     stride_kd, stride_vs, stride_vd, seqlen_k, scale_z_h, gamma_h, BLOCK_N, HEAD_DIM,
                                     POWER, False, PRECISION)
        else:
            dq, alpha_sum = dq_sweep(q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end,
                                     q_limit, q_doc, q_first, in_q, do, shift, tau, delta, dq, alpha_sum, stride_ks,
                                     stride_kd, stride_vs, stride_vd, seqlen_k, scale_z_h, gamma_h, BLOCK_N, HEAD_DIM,
                                     POWER, ALPHA_SUMS, PRECISION)
        if ALPHA_SUMS:  # (B, H, Sq), NaN on rows that see a non-finite score
            tl.store(Alpha_sums + rows, tl.where(tau != tau, float("nan"), alpha_sum), mask=in_q)

        DQ_tile = tile_ptrs(at_head(DQ, b, h, stride_dqb, stride_dqh), tile_q * BLOCK_M, stride_dqs, stride_dqd,
                            BLOCK_M, HEAD_DIM)
        dq = tl.where((tau == tau)[:, None], dq * softmax_scale, float("nan"))  # rows that see a non-finite score
        tl.store(DQ_tile, dq, mask=in_q[:, None])
