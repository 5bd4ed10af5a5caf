"""The Newton schedule on each row's candidate keys, for a query block that holds all its keys
(one device): one sweep of the key tiles instead of one per step.

Every key with ``z <= reference`` (the max pass's lower bound of tau) has p = 0 at every point a
Newton step visits, so the schedule's sums over all keys equal its sums over the *candidates*,
the keys above the reference. On attention rows they are few (tens, a few hundred on local rows
of 128K keys; every key only on flat rows) even where they sit in every key tile, which is what
makes such rows dense for a tile-sparse pass. ``candidate_schedule_kernel`` sweeps a query
tile's listed key tiles once, writing each row's candidates (the score q . k, before the shift
and scale that make it z, and the key) into its scratch rows, then runs every Newton step on
them from memory that this program just wrote: a step reads a few hundred bytes per row, where
a sweep recomputes Q.K^T on every listed tile.
From the candidates above tau it marks ``Keep`` (the output pass's tiles) exactly. With
``OUTPUT`` it also computes the output pass's sums from them (``candidate_output``): a row's
keys with p > 0 are among its candidates near tau, which hold their key, so the output needs
their rows of V alone, not another Q.K^T sweep of the tiles.

A query tile with a row of more than ``CANDIDATES`` candidates, or with at most ``few_tiles`` key
tiles (``triton_backend.FEW_TILES``), is *spilled*: it stores 1 into
``Spilled`` and leaves its rows to ``triton_newton.newton_schedule_kernel``, launched after on
the spilled query tiles only (and so does the output pass). Programs loop over the query tiles
(a persistent grid), so the scratch is per program, not per row: its size does not grow with the
sequence.
"""
import triton
import triton.language as tl

from .triton_common import (ADD, INTERPRETED, LN2, MAX, MIN, at_head, copy_power, dot, entmax_weights, form_copies,
                            gather_rows, list_slots, listed_query_tile_at, listed_scores, logits, of_query_head,
                            offset_strides, positive_gap, query_line, runs_form, score_cutoff, slope_and_log2,
                            tile_ptrs)
from .triton_tau import newton_live_rows_step, schedule_rows

NEG_INF_BITS = tl.constexpr(-8388608)  # -inf's float32 bits as an int32 (0xFF800000)
# candidates per row and trip of ``move_candidates_above``: its scan along the row in a thread's
# registers, where 64 a trip spilled (sm_90 code, D 64: 79 instructions a candidate, 43 at 16)
MOVE_CHUNK = tl.constexpr(16)
# candidates per row and trip of a Newton step's sums (``candidate_sums``)
SUMS_CHUNK = tl.constexpr(32)
# after this many Newton steps, a query tile whose longest row holds more than DROP_LONGEST
# candidates drops those below the bracket's lower bound: on local rows the first steps take tau
# from hundreds of candidates to the support's tens; on rows of few candidates the pass would
# cost more than the later steps save
DROP_STEP = tl.constexpr(2)
DROP_LONGEST = tl.constexpr(256)


@triton.jit
def store_candidates(Row_base, place, s, cutoff, offs_n):
    """Each candidate (score ``s > cutoff``; ``place``, int32, 1 + its place among this tile's
    candidates of its row) as a pair (s, its key ``offs_n``) into its row's scratch from
    ``Row_base`` (int32 pairs, past the row's earlier candidates), in the layout of the scores:
    ``tl.store`` would first move the tile to a layout of its own through shared memory (twice,
    with a barrier each), which cost more than the sweep. The interpreter takes ``tl.store``."""
    if INTERPRETED:
        key = tl.full(s.shape, 0, tl.int32) + offs_n[None, :]
        fits = s > cutoff[:, None]
        At = Row_base[:, None] + 2 * (place - 1)
        tl.store(At, s.to(tl.int32, bitcast=True), mask=fits)
        tl.store(At + 1, key, mask=fits)
    else:
        # one 8-byte store per candidate, its address and test computed here
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u64 a; setp.gt.f32 p, $3, $4; "
            "mad.wide.s32 a, $2, 8, $1; @p st.global.v2.b32 [a], {$3, $5}; mov.b32 $0, 0; }",
            "=r,l,r,f,f,r",
            [(Row_base - 2).to(tl.int64)[:, None], place, s, cutoff[:, None], offs_n[None, :]],
            dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def spread_slot(i, full_first, spacing, SAMPLE_TILES: tl.constexpr):
    """The ``i``-th slot of the full tiles' loop when it first visits ``SAMPLE_TILES`` tiles
    spread over the row: the first ``SAMPLE_TILES * spacing`` slots as ``SAMPLE_TILES`` runs of
    ``spacing``, taken round robin (so the first ``SAMPLE_TILES`` steps visit the first slot of
    each run), the rest in order; ``spacing`` 0 keeps the order. A bijection of the slots."""
    k = i - full_first
    round_robin = (k % SAMPLE_TILES) * spacing + k // SAMPLE_TILES
    return full_first + tl.where(k < SAMPLE_TILES * spacing, round_robin, k)


@triton.jit
def gather_candidates(q, K, K_pos, K_doc, K_win_pos, Tile_index, first, stop, spacing, full_first, full_end, q_limit,
                      q_doc, q_first, offs_m, Row_slots, found, cutoff, prefix, limit, stride_ks, stride_kd,
                      seqlen_q, seqlen_k, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr,
                      SAMPLE_TILES: tl.constexpr, UNROLL: tl.constexpr, PRECISION: tl.constexpr):
    """Over the steps [first, stop) of one of the two loops of listed tiles (``list_slots``; with
    ``FULL`` in the order of ``spread_slot``), every key whose score (``listed_scores``: before the
    shift and scale, which the later loops apply to the few candidates) is above ``cutoff``
    (``score_cutoff``) appended with it to the row's scratch (``Row_slots``, ``CANDIDATES +
    BLOCK_N`` slots a row) while the row holds at most ``limit`` (at most ``CANDIDATES``;
    ``store_candidates``): a row that starts a tile with room takes all of that tile's candidates,
    so the test is per row and tile, not per key, and a row past ``limit`` (its query tile then
    spills) stops counting. ``found`` (float32, exact: the later loops compare it with float32
    slots, in fewer registers) counts what the row holds. A candidate's place among its tile's row
    is a product with ``prefix`` (int8 ones on and above the diagonal) on the tensor cores, in int8
    with int32 sums: a scan along the row would move the tile to another layout and back through
    shared memory."""
    counted = found.to(tl.int32)
    for i in tl.range(first, stop, loop_unroll_factor=UNROLL if FULL else 1):
        j = i
        if FULL:
            j = spread_slot(i, full_first, spacing, SAMPLE_TILES)
        _, offs_n, s = listed_scores(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit,
                                     q_doc, q_first, offs_m, stride_ks, stride_kd, seqlen_q, seqlen_k, HEAD_DIM,
                                     BLOCK_N, FULL, PRECISION)
        open_cutoff = tl.where(counted <= limit, cutoff, float("inf"))
        near = s > open_cutoff[:, None]  # NaN and hidden pairs (-inf) are never candidates
        place = tl.dot(near.to(tl.int8), prefix, out_dtype=tl.int32)
        store_candidates(Row_slots + 2 * counted, place, s, open_cutoff, offs_n)
        counted += tl.reduce(place, 1, MAX)
    return counted.to(tl.float32)


@triton.jit
def candidate_sums(Row_slots, found, longest, t, shift, scale_z, gamma, POWER: tl.constexpr, BLOCK_M: tl.constexpr,
                   CHUNK: tl.constexpr):
    """``triton_newton.newton_sweep``'s sums at ``t`` over the rows' candidates: ``(f, f', count,
    closest)`` per row, float64 (``closest``: the smallest gap ``z - t > 0``, +inf where none).
    The sums run per slot column and meet across the row once a step: a row reduction per trip
    takes the tile through shared memory, with barriers, every trip. ``CHUNK``: four
    accumulators of ``CHUNK`` per row must fit the registers (docs/design.md, candidate keys)."""
    f_acc = tl.full([BLOCK_M, CHUNK], 0.0, tl.float32)
    df_acc = tl.full([BLOCK_M, CHUNK], 0.0, tl.float32)
    above_acc = tl.full([BLOCK_M, CHUNK], 0.0, tl.float32)
    closest_acc = tl.full([BLOCK_M, CHUNK], float("inf"), tl.float32)
    cols = tl.arange(0, CHUNK)
    for FORM in tl.static_range(form_copies(POWER)):  # triton_common.runs_form
        if runs_form(gamma, FORM, POWER):
            for first in range(0, longest, CHUNK):
                listed = (first + cols)[None, :] < found[:, None]
                s = tl.load(Row_slots[:, None] + 2 * (first + cols[None, :]), mask=listed, other=NEG_INF_BITS)
                z = logits(s.to(tl.float32, bitcast=True), shift[:, None], scale_z)  # -inf where not listed
                gap = positive_gap(z, t[:, None])
                p, u = entmax_weights(gap, gamma, copy_power(POWER, FORM))
                f_acc += p
                df_acc += u
                above_acc += tl.where(gap > 0, 1.0, 0.0)
                closest_acc = tl.minimum(closest_acc, tl.where(gap > 0, gap, float("inf")))
    f_sum = tl.reduce(f_acc, 1, ADD)
    df_sum = tl.reduce(df_acc, 1, ADD)
    above = tl.reduce(above_acc, 1, ADD)
    closest = tl.reduce(closest_acc, 1, MIN)
    return f_sum.to(tl.float64), df_sum.to(tl.float64), above.to(tl.float64), closest.to(tl.float64)


@triton.jit
def move_candidates_above(Row_slots, found, longest, bound, shift, scale_z, Keep_row, MARK: tl.constexpr,
                          BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Moves the rows' candidates with ``z > bound`` (float32 per row), in order, to the front of
    their row's slots and returns their count per row (int32); with ``MARK``, also marks their key
    tiles in ``Keep_row`` (the query tile's row of ``Keep``). Called with ``tau - margin``, it
    marks the tiles that may hold p > 0 and leaves the output a row's few keys near tau (its
    support and a margin), not all its candidates (up to the slots, on local rows ten times the
    support). A candidate moves to a slot at or before its own, so only this chunk's slots are
    rewritten, after every thread has read them; a caller reads the moved slots after a barrier."""
    moved = tl.full(found.shape, 0, tl.int32)
    cols = tl.arange(0, CHUNK)
    for first in range(0, longest, CHUNK):
        At = Row_slots[:, None] + 2 * (first + cols[None, :])
        listed = (first + cols)[None, :] < found[:, None]
        bits = tl.load(At, mask=listed, other=NEG_INF_BITS)
        z = logits(bits.to(tl.float32, bitcast=True), shift[:, None], scale_z)
        above = listed & (z > bound[:, None])
        key = tl.load(At + 1, mask=above, other=0)
        if MARK:
            tl.store(Keep_row + key // BLOCK_N, tl.full(above.shape, 1, tl.int8), mask=above)
        place = moved[:, None] + tl.associative_scan(above.to(tl.int32), 1, ADD) - 1
        tl.debug_barrier()  # the chunk's slots are read before any is rewritten
        To = Row_slots[:, None] + 2 * place
        tl.store(To, bits, mask=above)
        tl.store(To + 1, key, mask=above)
        moved += tl.reduce(above.to(tl.int32), 1, ADD)
    return moved


@triton.jit
def candidate_output(Row_slots, found, longest, tau, shift, scale_z, V, Nonzero, stride_vs, stride_vd, gamma,
                     POWER: tl.constexpr, BACKWARD_SUMS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``triton_output.output_tiles``'s sums at ``tau`` (float32) from the rows' first ``found``
    candidates (int32; those ``move_candidates_above`` moved to the front), one of every row per
    trip: ``(sum p v, sum u v, sum u, support)``, each key's row of V read where its p > 0 (the
    candidates near tau hold every such key), and the key tiles holding one marked in ``Nonzero``
    (the query tile's row of it). p and u meet V in float32."""
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    acc_u = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    u_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    support = tl.full([BLOCK_M], 0.0, tl.float32)
    for slot in range(0, longest):
        s = tl.load(Row_slots + 2 * slot, mask=slot < found, other=NEG_INF_BITS).to(tl.float32, bitcast=True)
        z = logits(s, shift, scale_z)
        gap = positive_gap(z, tau)
        held = gap > 0
        key = tl.load(Row_slots + 2 * slot + 1, mask=held, other=0)
        p, u = entmax_weights(gap, gamma, POWER)
        v = gather_rows(V, key, held, stride_vs, stride_vd, HEAD_DIM)
        acc += p[:, None] * v.to(tl.float32)
        if BACKWARD_SUMS:
            acc_u += u[:, None] * v.to(tl.float32)
            u_sum += u
        support += tl.where(held, 1.0, 0.0)
        tl.store(Nonzero + key // BLOCK_N, tl.full(key.shape, 1, tl.int8), mask=held)
    return acc, acc_u, u_sum, support


@triton.jit
def candidate_alpha_sums(Row_slots, found, longest, tau, shift, scale_z, V, stride_vs, stride_vd, gamma,
                         POWER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The forward's part of dL/dalpha (``EntmaxSpec.alpha_terms``) from the rows' first ``found``
    candidates (those ``move_candidates_above`` moved to the front), one of every row per trip:
    ``(sum c v, sum c)`` with ``c = p (1 - log gap)`` on the support, float32. The backward's row
    sum ``sum (g - delta) c`` is then ``dO . sum c v - delta sum c``, one dot product per row
    (``triton_backward.dq_kernel``, ``ALPHA_SPLIT``), where it would be a log, a product and a
    row reduction per element of every tile. A second trip over the candidates rather than a
    third accumulator in ``candidate_output``: three (rows, D) float32 tiles at once exceed the
    registers."""
    acc_c = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    c_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    for slot in range(0, longest):
        s = tl.load(Row_slots + 2 * slot, mask=slot < found, other=NEG_INF_BITS).to(tl.float32, bitcast=True)
        gap = positive_gap(logits(s, shift, scale_z), tau)
        held = gap > 0
        key = tl.load(Row_slots + 2 * slot + 1, mask=held, other=0)
        # the power and the log as dq_kernel takes them
        u, log2_gap = slope_and_log2(gap, gamma, POWER)
        c = tl.where(held, gap * u * (1.0 - LN2 * log2_gap), 0.0)
        acc_c += c[:, None] * gather_rows(V, key, held, stride_vs, stride_vd, HEAD_DIM).to(tl.float32)
        c_sum += c
    return acc_c, c_sum


@triton.jit
def candidate_schedule_kernel(
    Q, K, V, Q_limit, Q_doc, Q_first, K_pos, K_doc, K_win_pos, K_full_lo, K_full_hi, Tile_count, Tile_index, Shift,
    Reference, Row_max, Tau, Keep, Spilled, Cand, Out, Out_u, U_sum, Support, Nonzero, Out_c, C_sum,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    seqlen_q, seqlen_k, num_heads, num_q_tiles, num_k_tiles, list_width, num_tiles, few_tiles, crowded_ratio,
    crowded_floor, sample_from, sample_margin, gather_parts, gather_part_tiles, scale_z, gamma,
    margin, tolerance, step_tolerance,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    POWER: tl.constexpr, MAX_STEPS: tl.constexpr, NARROW_STEP: tl.constexpr, CANDIDATES: tl.constexpr,
    CHUNK: tl.constexpr, OUTPUT: tl.constexpr, BACKWARD_SUMS: tl.constexpr, ALPHA_SUMS: tl.constexpr,
    SAMPLE_TILES: tl.constexpr, UNROLL: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PER_HEAD: tl.constexpr,
):
    """For each of the ``num_tiles`` (query tile, batch x head) this program takes (the last query
    tiles first: under a causal mask they hold the most keys), tau (float64) into ``Tau`` and its
    key tiles with a candidate above ``tau - margin`` into ``Keep`` (int8, zeros from the caller),
    or 1 into ``Spilled`` (int8 per query tile) where a row holds more candidates than
    ``CANDIDATES`` or (``crowded_ratio`` > 0) both ``crowded_floor`` and one in ``crowded_ratio``
    of the keys of the listed tiles, where the query tile lists at most ``few_tiles`` key tiles,
    or (a query tile of at least ``sample_from`` listed tiles with every pair visible, which it
    gathers in the order of ``spread_slot``) where a row's candidates among the first
    ``SAMPLE_TILES`` of those tiles, times its listed tiles over ``SAMPLE_TILES``, pass
    ``sample_margin`` times that limit: such a query tile gathers no further (``Tau`` and ``Keep``
    then left to ``newton_schedule_kernel``). The full tiles are gathered in ``gather_parts`` parts
    of at least ``gather_part_tiles`` tiles, and a query tile with a row past its limit after a
    part gathers no further either. ``Reference`` and ``Row_max`` start each row's
    bracket as ``newton_schedule_kernel`` does (``Row_max`` NaN on rows that see a score that is
    not finite);
    ``Cand`` (int32) holds ``BLOCK_M x (CANDIDATES + BLOCK_N)`` pairs (the bits of the score q . k, its key)
    per program.
    With ``OUTPUT``, the query tiles not spilled also store ``output_kernel``'s results (``Out``,
    with ``BACKWARD_SUMS`` ``Out_u`` and ``U_sum``, ``Support``, ``Nonzero``: zeros from the
    caller), NaN rows of ``Out`` where ``Row_max`` is NaN, and with ``ALPHA_SUMS``
    ``candidate_alpha_sums`` into ``Out_c`` (float32, ``Out``'s shape and strides) and ``C_sum``.
    See the module doc."""
    stride_qs, stride_qh = offset_strides(stride_qs, stride_qh, WIDE_OFFSETS)
    stride_ks, stride_kh = offset_strides(stride_ks, stride_kh, WIDE_OFFSETS)
    stride_vs, stride_vh = offset_strides(stride_vs, stride_vh, WIDE_OFFSETS)
    stride_os, stride_oh = offset_strides(stride_os, stride_oh, WIDE_OFFSETS)
    tl.static_assert(HEAD_DIM >= 16 and HEAD_DIM <= 256)
    tl.static_assert(CANDIDATES % CHUNK == 0)
    program = tl.program_id(0)
    Row_slots = Cand + (program * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64) * (2 * (CANDIDATES + BLOCK_N))
    keys = tl.arange(0, BLOCK_N)
    prefix = tl.where(keys[:, None] <= keys[None, :], 1, 0).to(tl.int8)
    for work in range(program, num_tiles, tl.num_programs(0)):
        line = query_line(work % num_q_tiles, num_q_tiles)
        (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K_head, count, Index, tile_row,
         full_first, full_end) = listed_query_tile_at(
            line, work // num_q_tiles, num_q_tiles, Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count,
            Tile_index, stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads,
            num_k_tiles, list_width, GROUP, HEAD_DIM, BLOCK_M)
        if count <= few_tiles:  # routed to the sweeps by the count of its key tiles (FEW_TILES)
            tl.store(Spilled + bh * num_q_tiles + tile_q, tl.full([], 1, tl.int8))
        else:
            shift, row_max, reference, done = schedule_rows(Shift, Row_max, Reference, rows, in_q)
            scale_z_h, gamma_h = of_query_head(scale_z, h, PER_HEAD), of_query_head(gamma, h, PER_HEAD)
            # below the reference by the margin of the tile marks: a key a kernel's rounding could
            # put above tau - margin is a candidate
            cutoff = score_cutoff(tl.where(done, float("inf"), reference - margin), shift, scale_z_h)
            # a row of more candidates than one in crowded_ratio of the listed keys costs more in the
            # Newton steps on its candidates, which every row of the tile takes as long as the longest,
            # than the sweeps; on short rows (a causal mask's first query tiles) the sweeps' launch
            # and output pass cost more than a few hundred candidates (docs/design.md, candidate keys)
            share = tl.maximum(count * BLOCK_N // tl.maximum(crowded_ratio, 1), crowded_floor)
            limit = tl.where(crowded_ratio > 0, tl.minimum(share, CANDIDATES), CANDIDATES)
            # a flat row (thousands of keys within one of its max) would store candidates up to the
            # limit before its query tile spills, and the stores are what its gather costs: the gather
            # takes a few tiles spread over the row first (spread_slot), and where their candidates,
            # scaled to the row, pass the limit by the margin, the query tile spills at once
            num_full = full_end - full_first
            spacing = tl.where(num_full >= sample_from, num_full // SAMPLE_TILES, 0)
            sampled = tl.where(spacing > 0, SAMPLE_TILES, 0)
            found = tl.full([BLOCK_M], 0.0, tl.float32)
            tl.debug_barrier()  # the last tile's reads of the scratch are over before it is rewritten
            found = gather_candidates(q, K_head, K_pos, K_doc, K_win_pos, Index, full_first, full_first + sampled,
                                      spacing, full_first, full_end, q_limit, q_doc, q_first, offs_m, Row_slots, found,
                                      cutoff, prefix, limit, stride_ks, stride_kd, seqlen_q, seqlen_k, HEAD_DIM,
                                      BLOCK_N, True, SAMPLE_TILES, 1, PRECISION)
            crowded = (sampled > 0) & (tl.reduce(found, 0, MAX) * count > sample_margin * limit * sampled)
            # a crowded query tile's loops are empty, and its rows count one past the limit (it spills)
            for FULL in tl.static_range(2):  # the tiles that need a mask, then the others (list_slots)
                start, stop = list_slots(count, full_first, full_end, FULL)
                if FULL:
                    start += sampled
                stop = tl.where(crowded, start, stop)
                # the full tiles in parts: once a row has passed the limit its query tile spills
                # whatever the rest of its tiles hold, so the parts after that one are empty
                part = stop - start
                if FULL:
                    part = tl.maximum((stop - start + gather_parts - 1) // gather_parts, gather_part_tiles)
                for part_start in range(start, stop, tl.maximum(part, 1)):
                    part_stop = tl.minimum(part_start + part, stop)
                    if FULL:
                        part_stop = tl.where(tl.reduce(found, 0, MAX) > limit, part_start, part_stop)
                    found = gather_candidates(q, K_head, K_pos, K_doc, K_win_pos, Index, part_start, part_stop, spacing,
                                              full_first, full_end, q_limit, q_doc, q_first, offs_m, Row_slots, found,
                                              cutoff, prefix, limit, stride_ks, stride_kd, seqlen_q, seqlen_k,
                                              HEAD_DIM, BLOCK_N, FULL == 1, SAMPLE_TILES, UNROLL, PRECISION)
            found = tl.where(crowded, (limit + 1).to(tl.float32), found)
            tl.debug_barrier()  # every thread's candidates are in memory before any thread reads them
            longest = tl.reduce(found, 0, MAX).to(tl.int32)
            tl.store(Spilled + bh * num_q_tiles + tile_q, (longest > limit).to(tl.int8))
            if longest <= limit:
                point = reference.to(tl.float64)
                lower = point
                upper = row_max.to(tl.float64)
                live = tl.reduce((~done).to(tl.int32), 0, ADD)
                step = tl.full([], 0, tl.int32)  # a tensor: the loop reassigns it
                while (step < MAX_STEPS) & (live > 0):
                    t = point.to(tl.float32)
                    f, df, n, closest = candidate_sums(Row_slots, found, longest, t, shift, scale_z_h, gamma_h,
                                                       POWER, BLOCK_M, SUMS_CHUNK)
                    # the exact stop from the schedule's third step, as the sweeps take it: far below
                    # tau, the closed form from float32 sums is not exact to float32
                    closest = tl.where(step >= NARROW_STEP, closest, 0.0)
                    point, lower, upper, done, step, live = newton_live_rows_step(
                        f, df, n, closest, t, point, lower, upper, done, step, gamma_h, tolerance, step_tolerance,
                        POWER, True)
                    if (step == DROP_STEP) & (live > 0) & (longest > DROP_LONGEST):
                        # every later point is at or above the bracket's lower bound, so a key
                        # below it adds to no later sum; the margin keeps those the tiles' marks read
                        tl.debug_barrier()  # the sums' reads of the slots are over
                        found = move_candidates_above(Row_slots, found, longest, lower.to(tl.float32) - margin,
                                                      shift, scale_z_h, Keep, False, BLOCK_N, MOVE_CHUNK
                                                      ).to(tl.float32)
                        longest = tl.reduce(found, 0, MAX).to(tl.int32)
                        tl.debug_barrier()  # every thread's moved candidates are in memory
                tl.store(Tau + rows, point, mask=in_q)
                tl.debug_barrier()  # the last step's reads of the slots are over
                near = move_candidates_above(Row_slots, found, longest, point.to(tl.float32) - margin, shift,
                                             scale_z_h, Keep + tile_row, True, BLOCK_N, MOVE_CHUNK)
                if OUTPUT:
                    tau = point.to(tl.float32)  # as the output pass reads it
                    tl.debug_barrier()  # every thread's moved candidates are in memory before any reads them
                    acc, acc_u, u_sum, support = candidate_output(
                        Row_slots, near, tl.reduce(near, 0, MAX), tau, shift, scale_z_h,
                        at_head(V, b, h // GROUP, stride_vb, stride_vh),
                        Nonzero + tile_row, stride_vs, stride_vd, gamma_h, POWER, BACKWARD_SUMS, HEAD_DIM, BLOCK_M,
                        BLOCK_N)
                    acc = tl.where((row_max == row_max)[:, None], acc, float("nan"))  # a non-finite score
                    tl.store(tile_ptrs(at_head(Out, b, h, stride_ob, stride_oh), tile_q * BLOCK_M, stride_os,
                                       stride_od, BLOCK_M, HEAD_DIM), acc, mask=in_q[:, None])
                    if BACKWARD_SUMS:
                        tl.store(tile_ptrs(at_head(Out_u, b, h, stride_ob, stride_oh), tile_q * BLOCK_M, stride_os,
                                           stride_od, BLOCK_M, HEAD_DIM), acc_u, mask=in_q[:, None])
                        tl.store(U_sum + rows, u_sum, mask=in_q)
                    tl.store(Support + rows, support, mask=in_q)
                    if ALPHA_SUMS:
                        acc_c, c_sum = candidate_alpha_sums(
                            Row_slots, near, tl.reduce(near, 0, MAX), tau, shift, scale_z_h,
                            at_head(V, b, h // GROUP, stride_vb, stride_vh), stride_vs, stride_vd, gamma_h, POWER,
                            HEAD_DIM, BLOCK_M)
                        tl.store(tile_ptrs(at_head(Out_c, b, h, stride_ob, stride_oh), tile_q * BLOCK_M, stride_os,
                                           stride_od, BLOCK_M, HEAD_DIM), acc_c, mask=in_q[:, None])
                        tl.store(C_sum + rows, c_sum, mask=in_q)
