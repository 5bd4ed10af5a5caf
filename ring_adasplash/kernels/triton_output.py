"""Output pass: for a known tau, sum p v, sum u v, sum u and the support, over the listed key tiles.
Sum u v and sum u serve the backward alone: with ``BACKWARD_SUMS`` off (a call with no backward
to come) their product and sum are left out.

One program per (query tile, batch x query head), visiting only its listed key tiles. With
``gap = (z - tau)_+`` (z relative to the row's score max, ``Shift``): p = gap^gamma,
u = gap^(gamma - 1) (0 off the support), by ``POWER`` (``EntmaxSpec.power``). P and U meet V in
V's dtype with fp32 accumulation, as in flash attention. ``Nonzero[tile]`` (zeros from the
caller) is set for every visited tile that holds a key with p > 0. Rows whose tau is NaN (they
see a score that is not finite) come out NaN. With ``SPILLED_ONLY`` only the query tiles marked in
``Spilled`` run: the candidate kernel (``triton_candidates``) computed the others. The sums are stored in float32 (why:
docs/design.md (kernel choices)).
"""
import triton
import triton.language as tl

from .triton_common import (ADD, at_head, copy_power, dot, entmax_weights, form_copies, list_slots, listed_logits,
                            listed_query_tile, load_rows, of_query_head, offset_strides, positive_gap, runs_form,
                            runs_here, tile_ptrs)


@triton.jit
def output_tiles(q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc, q_first,
                 offs_m, Nonzero, shift, tau, acc, acc_u, u_sum, support, stride_ks, stride_kd, stride_vs, stride_vd,
                 seqlen_q, seqlen_k, scale_z, gamma, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 POWER: tl.constexpr, BACKWARD_SUMS: tl.constexpr, FULL: tl.constexpr, UNROLL: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The sums over one of the two loops of listed tiles (``list_slots``)."""
    start, stop = list_slots(count, full_first, full_end, FULL)
    # UNROLL tiles per trip over the fully visible tiles (the launcher's setting), written in place:
    # Triton 3.6 does not take a helper's result as the factor
    for j in tl.range(start, stop, loop_unroll_factor=UNROLL if FULL else 1):
        tile_k, offs_n, z = listed_logits(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit,
                                          q_doc, q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, shift,
                                          scale_z, HEAD_DIM, BLOCK_N, FULL, PRECISION)
        gap = positive_gap(z, tau[:, None])
        p, u = entmax_weights(gap, gamma, POWER)
        v = load_rows(V, tile_k * BLOCK_N, offs_n < seqlen_k, stride_vs, stride_vd, BLOCK_N, HEAD_DIM)
        acc += dot(p.to(v.dtype), v, PRECISION)
        if BACKWARD_SUMS:
            acc_u += dot(u.to(v.dtype), v, PRECISION)
            u_sum += tl.reduce(u, 1, ADD)
        n_support = tl.reduce((gap > 0).to(tl.float32), 1, ADD)
        support += n_support
        # rows with p > 0 store the flag themselves (Nonzero starts at zero): no reduction across
        # the program's warps, which would hold every warp at a barrier on every tile
        tl.store(Nonzero + tile_k + tl.full(n_support.shape, 0, tl.int32), tl.full([], 1, tl.int8), mask=n_support > 0)
    return acc, acc_u, u_sum, support


@triton.jit
def output_kernel(
    Q, K, V, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift, Tau,
    Out, Out_u, U_sum, Support, Nonzero, Spilled,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    seqlen_q, seqlen_k, num_heads, num_k_tiles, list_width, scale_z, gamma,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, BACKWARD_SUMS: tl.constexpr, SPILLED_ONLY: tl.constexpr, UNROLL: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    stride_vs, stride_vh = offset_strides(stride_vs, stride_vh, WIDE_OFFSETS)
    stride_os, stride_oh = offset_strides(stride_os, stride_oh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    if runs_here(Spilled, SPILLED_ONLY):
        (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row, full_first,
         full_end) = listed_query_tile(
            Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
            stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles, list_width,
            GROUP, HEAD_DIM, BLOCK_M)
        scale_z_h = of_query_head(scale_z, h, PER_HEAD)  # a new name: the branch yields no pointer
        gamma_h = of_query_head(gamma, h, PER_HEAD)
        V = at_head(V, b, h // GROUP, stride_vb, stride_vh)
        shift = tl.load(Shift + rows, mask=in_q, other=0.0)
        tau = tl.load(Tau + rows, mask=in_q, other=float("inf"))
        Nonzero = Nonzero + tile_row
        acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
        acc_u = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
        u_sum = tl.full([BLOCK_M], 0.0, tl.float32)
        support = tl.full([BLOCK_M], 0.0, tl.float32)
        for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
            for FORM in tl.static_range(form_copies(POWER)):  # triton_common.runs_form
                if runs_form(gamma_h, FORM, POWER):
                    acc, acc_u, u_sum, support = output_tiles(
                        q, K, V, K_pos, K_doc, K_win_pos, Tile_index, count, full_first, full_end, q_limit, q_doc,
                        q_first, offs_m, Nonzero, shift, tau, acc, acc_u, u_sum, support, stride_ks, stride_kd,
                        stride_vs, stride_vd, seqlen_q, seqlen_k, scale_z_h, gamma_h, HEAD_DIM, BLOCK_N,
                        copy_power(POWER, FORM), BACKWARD_SUMS, FULL == 1, UNROLL,
                        PRECISION)

        acc = tl.where((tau == tau)[:, None], acc, float("nan"))  # rows that see a non-finite score
        tl.store(tile_ptrs(at_head(Out, b, h, stride_ob, stride_oh), tile_q * BLOCK_M, stride_os, stride_od, BLOCK_M,
                           HEAD_DIM), acc, mask=in_q[:, None])
        if BACKWARD_SUMS:
            tl.store(tile_ptrs(at_head(Out_u, b, h, stride_ob, stride_oh), tile_q * BLOCK_M, stride_os, stride_od,
                               BLOCK_M, HEAD_DIM), acc_u, mask=in_q[:, None])
            tl.store(U_sum + rows, u_sum, mask=in_q)
        tl.store(Support + rows, support, mask=in_q)
