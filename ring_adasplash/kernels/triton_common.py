"""Jit helpers shared by the Triton kernels (Triton inlines them into each kernel).

Conventions, as in Triton's fused-attention tutorial: pointers are Capitalised (``Q``, ``Tile_index``),
tiles and scalars lowercase, constexpr ALL_CAPS. Tensors come in the public layout (B, S, H, D)
with a stride per axis (``stride_qb, stride_qs, stride_qh, stride_qd``); per-row results are
head-major (B, H, S) and contiguous, so row ``offs_m`` of program ``bh`` is ``bh * seqlen + offs_m``.
The visibility rule is six int32 vectors: query ``i`` sees key ``j`` when ``K_pos[j] <=
Q_limit[i]``, ``K_win_pos[j] >= Q_first[i]`` and ``Q_doc[i] == K_doc[j]`` (``visibility.Visibility``).

``PRECISION`` (constexpr) of every product ``dot(a, b, PRECISION)``: ``"ieee"`` for float32 inputs
(IEEE float32, no TF32), ``"native"`` for 16-bit inputs on the GPU (tensor cores: exact products,
float32 sums), ``"f32"`` for 16-bit inputs under Triton's interpreter, whose ``tl.dot`` gets
16-bit operands wrong: there the operands, already rounded to the input dtype, are multiplied in
float32, which gives what the tensor cores give.
"""
import math
import os

import triton
import triton.language as tl

from . import entmax_spec

# Reductions: ``tl.reduce(x, axis, ADD)`` is ``tl.sum(x, axis)`` and ``tl.reduce(x, axis, MAX)`` is
# ``tl.max(x, axis)`` once compiled (MIN likewise). tl.sum and tl.max are @jit wrappers, and the
# interpreter (TRITON_INTERPRET=1) re-patches the language on every @jit call, milliseconds each;
# called with the standard combine functions, tl.reduce runs as one numpy reduction there. For the
# same reason (and because @jit helpers of triton.language imported without TRITON_INTERPRET cannot
# be called from interpreted kernels) the kernels use tl.full, not tl.zeros.
ADD = tl.standard._sum_combine
MAX = tl.standard._elementwise_max
MIN = tl.standard._elementwise_min


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` with float32 accumulation, at ``PRECISION`` (see the module doc)."""
    tl.static_assert(PRECISION == "ieee" or PRECISION == "native" or PRECISION == "f32")
    if PRECISION == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    elif PRECISION == "f32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def at_head(X, b, h, stride_b, stride_h):
    """``X`` (B, S, H, D) at batch ``b``, head ``h``."""
    return X + b.to(tl.int64) * stride_b + h * stride_h


@triton.jit
def offset_strides(stride_s, stride_h, WIDE_OFFSETS: tl.constexpr):
    """A tensor's position and head strides as its element offsets are computed: int64 where
    ``WIDE_OFFSETS`` (the launcher's ``wide_offsets``: an offset within one batch element may
    reach 2^31, from two million tokens at 16 heads and D 128 in one tensor), else int32 as
    passed: int64 offsets cost registers and time in the sweeps, so the kernels take them only
    where int32 would overflow."""
    if WIDE_OFFSETS:
        wide = tl.full([], 0, tl.int64)  # a sum, not a cast: a stride of 1 comes as a constexpr
        return stride_s + wide, stride_h + wide
    else:
        return stride_s, stride_h


@triton.jit
def tile_ptrs(X, start, stride_s, stride_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers (BLOCK, HEAD_DIM) to the rows ``start`` to ``start + BLOCK - 1`` of one head of ``X``."""
    return X + ((start + tl.arange(0, BLOCK))[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :] * stride_d)


@triton.jit
def load_rows(X, start, in_range, stride_s, stride_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The rows ``start`` to ``start + BLOCK - 1`` of one head of ``X`` (BLOCK, HEAD_DIM), zeros
    where not ``in_range``."""
    return tl.load(tile_ptrs(X, start, stride_s, stride_d, BLOCK, HEAD_DIM), mask=in_range[:, None], other=0.0)


@triton.jit
def column_ptrs(X, start, stride_s, stride_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``tile_ptrs`` transposed: (HEAD_DIM, BLOCK), ``q @ k^T`` with no transpose."""
    return X + ((start + tl.arange(0, BLOCK))[None, :] * stride_s + tl.arange(0, HEAD_DIM)[:, None] * stride_d)


@triton.jit
def load_columns(X, start, in_range, stride_s, stride_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The rows ``start`` to ``start + BLOCK - 1`` of one head of ``X`` as columns (HEAD_DIM,
    BLOCK), zeros where not ``in_range``."""
    return tl.load(column_ptrs(X, start, stride_s, stride_d, BLOCK, HEAD_DIM), mask=in_range[None, :], other=0.0)


@triton.jit
def gather_rows(X, rows, held, stride_s, stride_d, HEAD_DIM: tl.constexpr):
    """The rows ``rows`` (any order) of one head of ``X`` (len(rows), HEAD_DIM), zeros where not
    ``held``."""
    return tl.load(X + rows[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :] * stride_d, mask=held[:, None],
                   other=0.0)


@triton.jit
def query_positions(Q_limit, Q_doc, Q_first, offs_m, in_q):
    """The visibility vectors of the queries ``offs_m``: last and first key position seen, document."""
    return (tl.load(Q_limit + offs_m, mask=in_q, other=-1), tl.load(Q_doc + offs_m, mask=in_q, other=-1),
            tl.load(Q_first + offs_m, mask=in_q, other=0))


@triton.jit
def key_positions(K_pos, K_doc, K_win_pos, offs_n, in_k):
    """The visibility vectors of the keys ``offs_n``: position, document, position for the window."""
    return (tl.load(K_pos + offs_n, mask=in_k, other=0), tl.load(K_doc + offs_n, mask=in_k, other=0),
            tl.load(K_win_pos + offs_n, mask=in_k, other=0))


@triton.jit
def visible(q_limit, q_doc, q_first, in_q, k_pos, k_doc, k_win_pos, in_k):
    """Which (query, key) pairs are visible, from query and key vectors already broadcast against
    each other (queries down, keys across, or the transpose)."""
    return (k_pos <= q_limit) & (k_win_pos >= q_first) & (q_doc == k_doc) & in_k & in_q


@triton.jit
def program_tile(num_heads, seqlen, BLOCK: tl.constexpr):
    """This program's tile of a grid (tiles, batch x heads): ``tile_at`` its program ids."""
    return tile_at(tl.program_id(0), tl.program_id(1), num_heads, seqlen, BLOCK)


@triton.jit
def query_line(index, lines):
    """The query tile that the ``index``-th program (or work item) of ``lines`` query tiles per
    batch x head takes: the last first. Under a causal mask the last query tiles see the most key
    tiles; the GPU starts blocks in about the order of their program ids, so the long ones start
    first and the short ones fill the last wave, instead of the longest of the last head running
    alone at the end. Every kernel with one program per (query tile, batch x head) takes its tile
    here (docs/design.md, kernel choices)."""
    return lines - 1 - index


@triton.jit
def program_query_line():
    """``query_line`` of this program of a grid (query tiles, batch x heads)."""
    return query_line(tl.program_id(0), tl.num_programs(0))


@triton.jit
def program_query_tile(num_heads, seqlen, BLOCK: tl.constexpr):
    """``program_tile`` of a grid (query tiles, batch x heads): its ``program_query_line``."""
    return tile_at(program_query_line(), tl.program_id(1), num_heads, seqlen, BLOCK)


@triton.jit
def program_query_flag(Flags):
    """This program's entry of ``Flags`` (one per query tile of each batch x head, as the candidate
    kernel marks them) in a (query tiles, batch x heads) grid."""
    return tl.load(Flags + tl.program_id(1) * tl.num_programs(0) + program_query_line())


@triton.jit
def runs_here(Spilled, SPILLED_ONLY: tl.constexpr):
    """Whether this program's query tile of a (query tiles, batch x heads) grid runs: every one,
    or with ``SPILLED_ONLY`` those marked in ``Spilled`` (int8 per query tile, the candidate
    kernel's: ``triton_candidates``)."""
    if SPILLED_ONLY:
        run = program_query_flag(Spilled) != 0
    else:
        run = tl.program_id(0) >= 0
    return run


@triton.jit
def of_query_head(value, h, PER_HEAD: tl.constexpr):
    """A float argument that may differ per query head (``EntmaxSpec.kernel_constants``: alpha per
    head): the float itself, or with ``PER_HEAD`` query head ``h``'s entry of a float32 tensor."""
    if PER_HEAD:
        return tl.load(value + h)
    else:
        return value


@triton.jit
def tile_at(tile, bh, num_heads, seqlen, BLOCK: tl.constexpr):
    """Tile ``tile`` of batch x head ``bh``: ``(tile, bh, b, h, offs, in_range)``, the tile, batch x
    head, batch, head, its positions and which of them are in the sequence."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    return tile, bh, bh // num_heads, bh % num_heads, offs, offs < seqlen


@triton.jit
def query_tile(Q, Q_limit, Q_doc, Q_first, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query tile, for the kernels with one program per (query tile, batch x query
    head): ``(tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc, q_first)``."""
    return query_tile_at(program_query_line(), tl.program_id(1), Q, Q_limit, Q_doc, Q_first, stride_qb, stride_qs,
                         stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M)


@triton.jit
def query_tile_at(tile, bh, Q, Q_limit, Q_doc, Q_first, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q,
                  num_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``query_tile`` of query tile ``tile`` of batch x query head ``bh``."""
    tile_q, bh, b, h, offs_m, in_q = tile_at(tile, bh, num_heads, seqlen_q, BLOCK_M)
    q = load_rows(at_head(Q, b, h, stride_qb, stride_qh), tile * BLOCK_M, in_q, stride_qs, stride_qd, BLOCK_M,
                  HEAD_DIM)
    q_limit, q_doc, q_first = query_positions(Q_limit, Q_doc, Q_first, offs_m, in_q)
    return tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc, q_first


@triton.jit
def row_offsets(bh, seqlen, offs):
    """Where rows ``offs`` of batch x head ``bh`` sit in a head-major per-row result (B, H, S)."""
    return bh.to(tl.int64) * seqlen + offs


@triton.jit
def tile_row(line, bh, length):
    """Where the row of (batch x head ``bh``, ``line``) starts in a per-tile result of ``length``
    columns, with ``tl.num_programs(0)`` lines per batch x head."""
    return line_start(line, bh, tl.num_programs(0), length)


@triton.jit
def line_start(line, bh, lines, length):
    """``tile_row`` with ``lines`` lines per batch x head."""
    return (bh * lines + line).to(tl.int64) * length


@triton.jit
def listed_tiles(Tile_count, Tile_index, line, bh, length, width):
    """The tiles listed for this program (``triton_tiles``: one list of ``width`` slots per
    (batch x head, ``line``), ``tl.num_programs(0)`` lines per batch x head, over ``length``
    tiles): ``(count, Tile_index, tile_row)``, the list's length and start, and the offset of this
    line's row in per-tile outputs."""
    return listed_tiles_of(Tile_count, Tile_index, line, bh, tl.num_programs(0), length, width)


@triton.jit
def listed_tiles_of(Tile_count, Tile_index, line, bh, lines, length, width):
    """``listed_tiles`` with ``lines`` lines per batch x head."""
    count = tl.load(Tile_count + bh * lines + line)
    return count, Tile_index + line_start(line, bh, lines, width), line_start(line, bh, lines, length)


@triton.jit
def listed_tile(Tile_index, slot):
    """The tile at ``slot`` of a tile list, as int32: lists are stored in 16 bits where their
    tiles fit (``triton_tiles.tile_lists``), and a tile times its block size would not."""
    return tl.load(Tile_index + slot).to(tl.int32)


@triton.jit
def first_slot_at_least(Tile_index, count, tile):
    """The first slot of an ascending tile list ``Tile_index[:count]`` whose tile is at least
    ``tile`` (``count`` when none is), by bisection."""
    lo = tl.full([], 0, tl.int32)
    hi = lo + count
    while lo < hi:
        mid = (lo + hi) // 2
        below = listed_tile(Tile_index, mid) < tile
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def listed_query_tile(Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index,
                      stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_kh,
                      seqlen_q, num_heads, num_k_tiles, list_width,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``query_tile`` for the sparse passes, which visit the key tiles listed for it: also
    ``rows`` (the offsets of its rows in per-row results), ``K`` at its key head,
    ``listed_tiles`` and the slots [full_first, full_end) of the list that hold its tiles in the
    run [K_full_lo, K_full_hi) of key tiles whose every pair is visible (no per-element mask; the
    list is ascending, so they are consecutive): ``(tile_q, bh, b, h, offs_m, in_q, rows, q,
    q_limit, q_doc, q_first, K, count, Tile_index, tile_row, full_first, full_end)``. The passes
    visit them in two loops (``list_slots``)."""
    return listed_query_tile_at(program_query_line(), tl.program_id(1), tl.num_programs(0), Q, K, Q_limit, Q_doc,
                                Q_first, K_full_lo, K_full_hi, Tile_count, Tile_index, stride_qb, stride_qs,
                                stride_qh, stride_qd, stride_kb, stride_kh, seqlen_q, num_heads, num_k_tiles,
                                list_width, GROUP, HEAD_DIM, BLOCK_M)


@triton.jit
def listed_query_tile_at(tile, bh, num_q_tiles, Q, K, Q_limit, Q_doc, Q_first, K_full_lo, K_full_hi, Tile_count,
                         Tile_index, stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_kh,
                         seqlen_q, num_heads, num_k_tiles, list_width,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``listed_query_tile`` of query tile ``tile`` of batch x query head ``bh``, with
    ``num_q_tiles`` query tiles per batch x head (a kernel whose programs loop over tiles)."""
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc, q_first = query_tile_at(
        tile, bh, Q, Q_limit, Q_doc, Q_first, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads,
        HEAD_DIM, BLOCK_M)
    rows = row_offsets(bh, seqlen_q, offs_m)
    K = at_head(K, b, h // GROUP, stride_kb, stride_kh)
    count, Tile_index, tile_row = listed_tiles_of(Tile_count, Tile_index, tile_q, bh, num_q_tiles, num_k_tiles,
                                                  list_width)
    full_first = first_slot_at_least(Tile_index, count, tl.load(K_full_lo + tile_q))
    full_end = tl.maximum(first_slot_at_least(Tile_index, count, tl.load(K_full_hi + tile_q)), full_first)
    return (tile_q, bh, b, h, offs_m, in_q, rows, q, q_limit, q_doc, q_first, K, count, Tile_index, tile_row,
            full_first, full_end)


@triton.jit
def list_slots(count, full_first, full_end, FULL: tl.constexpr):
    """The loop of a sparse pass over its listed tiles, in two: with ``FULL`` the slots
    [full_first, full_end) (tiles with every pair visible), else the others (the diagonal, a
    window's edges, document boundaries), for ``j`` in ``range(*list_slots(...))`` at slot
    ``list_slot(j, full_first, full_end, FULL)``. A branch on the tile's kind inside one loop
    would put its loads under a condition, and the compiler pipelines no load under a condition:
    every tile would wait for its own loads."""
    if FULL:
        return full_first, full_end
    else:
        return full_first * 0, count - (full_end - full_first)


@triton.jit
def list_slot(j, full_first, full_end, FULL: tl.constexpr):
    """The slot of the ``j``-th step of a ``list_slots`` loop."""
    if FULL:
        return j
    else:
        return j + tl.where(j >= full_first, full_end - full_first, 0)


@triton.jit
def hide_invisible(z, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, in_q, offs_n, in_k, FULL: tl.constexpr):
    """``z`` (BLOCK_M, BLOCK_N) with -inf where a pair is not visible; as it is with ``FULL``
    (every pair of the tile visible: no position loads)."""
    if FULL:
        hidden = z
    else:
        k_pos, k_doc, k_win_pos = key_positions(K_pos, K_doc, K_win_pos, offs_n, in_k)
        pairs = visible(q_limit[:, None], q_doc[:, None], q_first[:, None], in_q[:, None], k_pos[None, :],
                        k_doc[None, :], k_win_pos[None, :], in_k[None, :])
        hidden = tl.where(pairs, z, float("-inf"))
    return hidden


@triton.jit
def key_tile_scores(q, K, tile_k, stride_ks, stride_kd, seqlen_k, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    FULL: tl.constexpr, PRECISION: tl.constexpr):
    """``(offs_n, in_k, s)`` of key tile ``tile_k``: its keys, which of them lie in the sequence,
    and s = q . k (BLOCK_M, BLOCK_N) fp32 of every pair, visible or not (a key past the sequence
    reads as zeros); with ``FULL`` the tile lies in the sequence (its keys are loaded unmasked)."""
    offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
    in_k = offs_n < seqlen_k
    if FULL:
        keys = tl.load(column_ptrs(K, tile_k * BLOCK_N, stride_ks, stride_kd, BLOCK_N, HEAD_DIM))
    else:
        keys = load_columns(K, tile_k * BLOCK_N, in_k, stride_ks, stride_kd, BLOCK_N, HEAD_DIM)
    return offs_n, in_k, dot(q, keys, PRECISION)


@triton.jit
def logits(s, shift, scale_z):
    """z = (s - shift) scale_z of scores ``s`` and their rows' ``shift`` (of the same shape): the
    shift is subtracted before the scale, as every kernel forms z."""
    return (s - shift) * scale_z


@triton.jit
def masked_logits(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tile_k,
                  stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """z = (q . k - shift) scale_z (BLOCK_M, BLOCK_N) fp32 of key tile ``tile_k`` (``shift`` per
    row), -inf where a pair is not visible."""
    offs_n, in_k, scores = key_tile_scores(q, K, tile_k, stride_ks, stride_kd, seqlen_k, HEAD_DIM, BLOCK_N, False,
                                           PRECISION)
    z = logits(scores, shift[:, None], scale_z)
    return hide_invisible(z, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m < seqlen_q, offs_n, in_k, False)


@triton.jit
def tile_logits(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tile_k,
                stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr, PRECISION: tl.constexpr):
    """z = (q . k - shift) scale_z (BLOCK_M, BLOCK_N) fp32 of key tile ``tile_k``: with ``FULL``
    every pair of the tile is visible (no position loads, no mask: most tiles of a causal layout),
    else ``masked_logits``. The shift is subtracted before the scale: both are exact where it
    matters (scores near the row's max), so z does not depend on the size of the scores."""
    if FULL:
        _, _, scores = key_tile_scores(q, K, tile_k, stride_ks, stride_kd, seqlen_k, HEAD_DIM, BLOCK_N, True,
                                       PRECISION)
        z = logits(scores, shift[:, None], scale_z)
    else:
        z = masked_logits(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tile_k,
                          stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z, HEAD_DIM, BLOCK_N, PRECISION)
    return z


@triton.jit
def listed_logits(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit, q_doc, q_first, offs_m,
                  stride_ks, stride_kd, seqlen_q, seqlen_k, shift, scale_z,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr, PRECISION: tl.constexpr):
    """The key tile of step ``j`` of a ``list_slots`` loop: ``(tile_k, offs_n, z)``
    (``tile_logits``)."""
    tile_k = listed_tile(Tile_index, list_slot(j, full_first, full_end, FULL))
    offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
    z = tile_logits(q, K, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m, tile_k, stride_ks, stride_kd,
                    seqlen_q, seqlen_k, shift, scale_z, HEAD_DIM, BLOCK_N, FULL, PRECISION)
    return tile_k, offs_n, z


@triton.jit
def listed_scores(q, K, K_pos, K_doc, K_win_pos, Tile_index, j, full_first, full_end, q_limit, q_doc, q_first, offs_m,
                  stride_ks, stride_kd, seqlen_q, seqlen_k,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr, PRECISION: tl.constexpr):
    """``listed_logits`` before the shift and scale: ``(tile_k, offs_n, s)``, s = q . k
    (BLOCK_M, BLOCK_N) fp32, -inf where a pair is not visible. ``logits(s, shift, scale_z)`` is
    the z of ``tile_logits`` bit for bit wherever a pair is visible."""
    tile_k = listed_tile(Tile_index, list_slot(j, full_first, full_end, FULL))
    offs_n, in_k, s = key_tile_scores(q, K, tile_k, stride_ks, stride_kd, seqlen_k, HEAD_DIM, BLOCK_N, FULL, PRECISION)
    s = hide_invisible(s, K_pos, K_doc, K_win_pos, q_limit, q_doc, q_first, offs_m < seqlen_q, offs_n, in_k, FULL)
    return tile_k, offs_n, s


@triton.jit
def score_cutoff(cutoff, shift, scale_z):
    """Per row, a score below which z = ``logits(s, shift, scale_z)`` is at most ``cutoff``: every
    key with z > cutoff has s above it (a few keys just below ``cutoff`` may too). It is
    ``cutoff / scale_z + shift`` lowered by 2^-18 of the magnitudes, which holds the rounding of
    both sides (a few units of 2^-24 of the same magnitudes); +inf where ``cutoff`` is."""
    unscaled = cutoff / scale_z
    lowered = unscaled + shift - (tl.abs(unscaled) + tl.abs(shift)) * 3.814697265625e-06
    return tl.where(cutoff == float("inf"), float("inf"), lowered)


@triton.jit
def positive_gap(z, tau):
    """``(z - tau)_+``, 0 where either is NaN: ``tl.maximum`` drops a NaN operand (maxnum, compiled
    and interpreted alike), so a row with a non-finite score (tau NaN) adds nothing; it is marked
    NaN whole."""
    return tl.maximum(z - tau, 0.0)


INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def max_with_nan(a, b):
    """Combine of a NaN-propagating max reduction (the max pass: a NaN score marks its row)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_max_with_nan(x):
    """Max over axis 1, NaN where a row holds one (``MAX`` drops NaN). The interpreter runs a
    combine function of our own one element at a time, so there NaN is counted instead."""
    if INTERPRETED:
        has_nan = tl.reduce((x != x).to(tl.int32), 1, ADD) > 0
        row_max = tl.where(has_nan, float("nan"), tl.reduce(x, 1, MAX))
    else:
        row_max = tl.reduce(x, 1, max_with_nan)
    return row_max


SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)  # of float32: 2^-126
LN2 = tl.constexpr(math.log(2.0))  # natural logs from the GPU's log2


@triton.jit
def approx_log2(x):
    """log2 of float32 ``x >= SMALLEST_NORMAL`` (callers clamp to it) by the GPU's approximate
    instruction (``lg2.approx.ftz.f32``, relative error about 2^-22, one ``MUFU.LG2``; the form
    without ``ftz`` is wrapped by the compiler in a test and a rescale for denormal inputs):
    ``tl.log2`` compiles to libdevice's correctly rounded log2, many instructions per element, which
    made the sums of dL/dalpha most of the dQ kernel's time (benchmarks/HISTORY.md). For terms where
    that error is far below the result's tolerance: the alpha gradient's sums, and powers of small
    exponent (``power_log2``). The interpreter takes ``tl.log2``."""
    if INTERPRETED:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


APPROX_LOG_MAX_GAMMA = tl.constexpr(entmax_spec.APPROX_LOG_MAX_GAMMA)
POWER_GENERAL = tl.constexpr(entmax_spec.POWER_GENERAL)
POWER_GENERAL_EXACT_LOG = tl.constexpr(entmax_spec.POWER_GENERAL_EXACT_LOG)
POWER_BY_HEAD = tl.constexpr(entmax_spec.POWER_BY_HEAD)
# Heads whose form is chosen per head (``POWER_BY_HEAD``) run their tile loops in four compiled
# copies, one per form: the general form with the correctly rounded log2, with the approximate one,
# and the closed forms of alpha 2 (gamma 1) and alpha 1.5 (gamma 2); a branch on gamma inside a
# loop keeps every form's code live there, and the loops spill. At each loop's call site:
#
#     for FORM in tl.static_range(form_copies(POWER)):  # one copy, or four
#         if runs_form(gamma, FORM, POWER):               # the copy this head runs
#             ... = tiles(..., copy_power(POWER, FORM), ...)
assert [entmax_spec.POWER_GENERAL_EXACT_LOG + form for form in range(4)] == [entmax_spec.POWER_GENERAL_EXACT_LOG,
                                                                             entmax_spec.POWER_GENERAL, 1, 2]
assert 2 <= entmax_spec.APPROX_LOG_MAX_GAMMA  # gamma 1 and 2 lie on the approximate log's side


@triton.constexpr_function
def form_copies(POWER):
    """How many compiled copies of a tile loop a kernel of ``POWER`` holds: one per form (four)
    with ``POWER_BY_HEAD``, else one."""
    return 4 if POWER == entmax_spec.POWER_BY_HEAD else 1


@triton.constexpr_function
def copy_power(POWER, FORM):
    """The ``POWER`` that copy ``FORM`` of a loop is compiled for: with ``POWER_BY_HEAD`` the
    copy's own form (``POWER_GENERAL_EXACT_LOG``, ``POWER_GENERAL``, 1, 2 for ``FORM`` 0 to 3),
    else the kernel's ``POWER``."""
    return entmax_spec.POWER_GENERAL_EXACT_LOG + FORM if POWER == entmax_spec.POWER_BY_HEAD else POWER


@triton.jit
def power_log2(x, gamma, POWER: tl.constexpr):
    """log2 of ``x >= SMALLEST_NORMAL`` for the powers ``x ** gamma`` and ``x ** (gamma - 1)``:
    ``approx_log2`` up to ``APPROX_LOG_MAX_GAMMA`` (``entmax_spec``), else correctly rounded; which
    one is the general form's ``POWER``, or with ``POWER_BY_HEAD`` a branch on gamma (a scalar: the
    same for every element)."""
    if POWER == POWER_GENERAL:
        log_x = approx_log2(x)
    elif POWER == POWER_GENERAL_EXACT_LOG:
        log_x = tl.log2(x)
    elif gamma <= APPROX_LOG_MAX_GAMMA:
        log_x = approx_log2(x)
    else:
        log_x = tl.log2(x)
    return log_x


@triton.jit
def runs_form(gamma, FORM: tl.constexpr, POWER: tl.constexpr):
    """Whether a head of ``gamma`` runs the copy ``FORM`` of a loop (the comment at ``POWER_BY_HEAD``):
    with ``POWER_BY_HEAD``, the copy whose form (``copy_power``) is the head's: the closed
    form where gamma is 2 or 1, the approximate log2 at any other gamma up to
    ``APPROX_LOG_MAX_GAMMA``, the correctly rounded one above it, NaN included; else the one copy."""
    if POWER == POWER_BY_HEAD:
        if copy_power(POWER, FORM) == 2:
            runs = gamma == 2.0
        elif copy_power(POWER, FORM) == 1:
            runs = gamma == 1.0
        elif copy_power(POWER, FORM) == POWER_GENERAL:
            runs = (gamma <= APPROX_LOG_MAX_GAMMA) & (gamma != 1.0) & (gamma != 2.0)
        else:
            runs = ~(gamma <= APPROX_LOG_MAX_GAMMA)
    else:
        runs = tl.full([], 1, tl.int1)
    return runs


@triton.jit
def slope_of_log2(d, log2_d, gamma):
    """``d ** (gamma - 1)`` for d >= 0 (0 where d is 0) from ``log2_d``, the log2 of
    ``max(d, SMALLEST_NORMAL)`` (a positive d below the smallest normal float, never met: z and tau
    are of order one, so a gap is 0 or far above it, is taken at that float)."""
    return tl.where(d > 0, tl.exp2((gamma - 1.0) * log2_d), 0.0)


@triton.jit
def power_and_slope(d, gamma, POWER: tl.constexpr):
    """(d ** gamma, d ** (gamma - 1)) for d >= 0 (``EntmaxSpec.power_and_slope``): ``POWER`` is
    gamma when gamma is 1 or 2 (alpha 2 or 1.5), else the general form (any gamma, through exp2 /
    log2; ``power_log2``)."""
    if POWER == 1:
        return d, tl.where(d > 0, 1.0, 0.0)
    elif POWER == 2:
        return d * d, d
    else:
        slope = slope_of_log2(d, power_log2(tl.maximum(d, SMALLEST_NORMAL), gamma, POWER), gamma)
        return d * slope, slope


@triton.jit
def slope_and_log2(d, gamma, POWER: tl.constexpr):
    """``power_and_slope``'s slope and ``approx_log2(max(d, SMALLEST_NORMAL))`` (the log that the
    alpha gradient's sums take), for d >= 0: one log2 for both where the slope is exp2 of it."""
    log2_d = approx_log2(tl.maximum(d, SMALLEST_NORMAL))
    if POWER == POWER_GENERAL:
        slope = slope_of_log2(d, log2_d, gamma)
    else:
        _, slope = power_and_slope(d, gamma, POWER)
    return slope, log2_d


@triton.jit
def entmax_weights(gap, gamma, POWER: tl.constexpr):
    """p = gap^gamma and u = gap^(gamma - 1) on the support (gap > 0), 0 elsewhere
    (``EntmaxSpec.weights``): ``power_and_slope``, whose p is gap u (one power, not two)."""
    return power_and_slope(gap, gamma, POWER)
