"""Tile masks from the tile gaps' codes, compact tile lists (per row of a block mask, the
positions of its True entries) and a mask's bits (``pack_tiles``).

``lower_bound_mask`` is ``stats.lower_bound_mask`` in one launch (some twenty small ops there).
Every sparse pass visits, per program, the key tiles (or query tiles) its row of the mask lists,
as FlexAttention's ``kv_num_blocks`` / ``kv_indices``. One program per row walks it in chunks:
a prefix sum of the chunk's flags gives each True entry its slot (why not a sort:
docs/design.md (kernel choices)).
"""
import torch
import triton
import triton.language as tl

from . import stats as S
from .block_mask import packed_width, popcount
from .compile_ahead import launch
from .triton_common import ADD, MIN

TILE_LIST_CHUNK = 1024  # mask entries per step of a tile-list program
MASK_CHUNK = 1024  # key tiles per step of a lower-bound-mask program
PACK_BLOCK = 512  # bytes of bits per program of pack_tiles_kernel
# Lists whose full size (a slot per tile) would exceed this many bytes get as many slots per row as
# their longest row holds, which the host reads first (it waits for the GPU: cheap against the passes
# over that many tiles; 16 GiB of lists at a million tokens and 16 heads, mostly unused on sparse rows)
COMPACT_LISTS_BYTES = 1 << 28


@triton.jit
def lower_bound_mask_kernel(Gap_codes, Lower, Reference, Empty, Within, Mask, seqlen_q, num_k_tiles,
                            MARGIN: tl.constexpr, GAP_LOW: tl.constexpr, GAP_STEP: tl.constexpr,
                            ROUNDING: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                            WITHIN: tl.constexpr):
    """One program per (query tile, batch x head): the code threshold of its rows' smallest bound
    ``max(Lower - Reference, 0) - MARGIN`` (+inf on ``Empty`` rows and past the sequence;
    ``stats.code_threshold``), then ``Mask`` (int8 0/1) = ``Gap_codes`` (uint8) above it, over its
    ``num_k_tiles`` key tiles, and with ``WITHIN`` also set in ``Within`` (int8 0/1, laid out as
    ``Gap_codes``). ``Lower``, ``Reference`` (float32), ``Empty`` (int8): (B, H, Sq)."""
    tile_q = tl.program_id(0)
    offs_m = tile_q * BLOCK_M + tl.arange(0, BLOCK_M)
    in_q = offs_m < seqlen_q
    rows = tl.program_id(1).to(tl.int64) * seqlen_q + offs_m
    lower = tl.load(Lower + rows, mask=in_q, other=0.0)
    reference = tl.load(Reference + rows, mask=in_q, other=0.0)
    empty = (tl.load(Empty + rows, mask=in_q, other=1) != 0) | ~in_q
    bound = tl.where(empty, float("inf"), tl.maximum(lower - reference, 0.0) - MARGIN)
    least = tl.reduce(bound, 0, MIN)
    steps = tl.minimum(tl.maximum(tl.floor((least - GAP_LOW) / GAP_STEP - ROUNDING), 0.0), 253.0)
    threshold = tl.where(least == float("inf"), 255.0, steps + 1.0)
    line = (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tile_q) * num_k_tiles
    for start in range(0, num_k_tiles, CHUNK):
        offs_k = start + tl.arange(0, CHUNK)
        codes = tl.load(Gap_codes + line + offs_k, mask=offs_k < num_k_tiles, other=0)
        kept = codes.to(tl.float32) > threshold
        if WITHIN:
            kept = kept & (tl.load(Within + line + offs_k, mask=offs_k < num_k_tiles, other=0) != 0)
        tl.store(Mask + line + offs_k, kept.to(tl.int8), mask=offs_k < num_k_tiles)


def lower_bound_mask(gap_codes: torch.Tensor, lower: torch.Tensor, reference: torch.Tensor, empty: torch.Tensor,
                     block_m: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """``stats.lower_bound_mask`` (B, H, nQ, nK) bool in one launch (``lower_bound_mask_kernel``):
    ``gap_codes`` (B, H, nQ, nK) uint8, ``lower`` and ``reference`` (B, H, Sq), ``empty`` (B, H, Sq)
    bool; ``within`` None or (B, H, nQ, nK) bool, and-ed in the same launch (an and of its own is
    one more pass over the tile grid). Its threshold arithmetic rounds as float32 (PyTorch's may
    divide by a reciprocal): the codes' ``GAP_ROUNDING`` holds that, and a tile on the edge is kept
    either way."""
    batch, heads, num_q_tiles, num_k_tiles = gap_codes.shape  # rows (B, H, Sq) of the same B, H
    mask = torch.empty(gap_codes.shape, device=gap_codes.device, dtype=torch.int8)
    if mask.numel():
        if within is not None:
            within = torch.broadcast_to(within, mask.shape).contiguous().view(torch.int8)
        launch(lower_bound_mask_kernel, (num_q_tiles, batch * heads))(
            Gap_codes=gap_codes.contiguous(), Lower=lower.to(torch.float32).contiguous(),
            Reference=reference.to(torch.float32).contiguous(), Empty=empty.contiguous().view(torch.int8),
            Within=mask if within is None else within, WITHIN=within is not None, Mask=mask,
            seqlen_q=lower.shape[-1], num_k_tiles=num_k_tiles, MARGIN=S.MASK_MARGIN, GAP_LOW=S.GAP_LOW,
            GAP_STEP=S.GAP_STEP, ROUNDING=S.GAP_ROUNDING, BLOCK_M=block_m,
            CHUNK=min(MASK_CHUNK, triton.next_power_of_2(max(num_k_tiles, 16))), num_warps=4)
    return mask.view(torch.bool)


@triton.jit
def list_true(Line, stride, first, end, Count, Index, bit, CHUNK: tl.constexpr, PACKED_ALONG: tl.constexpr):
    """The positions of the set entries ``first <= j < end`` of a line of mask entries, ascending,
    into ``Index[:count]``; their number into ``Count``. ``PACKED_ALONG``: the line is bits, entry
    ``j`` bit ``j % 8`` of the byte ``Line[(j // 8) * stride]``; else entry ``j`` is bit ``bit`` of
    ``Line[j * stride]`` (bit 0 of a bool mask, or one bit position of every byte of a column of
    bits)."""
    count = 0
    for start in range(first, end, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        if PACKED_ALONG:
            word = tl.load(Line + (offs >> 3) * stride, mask=offs < end, other=0).to(tl.int32)
            flag = (word >> (offs & 7)) & 1
        else:
            flag = (tl.load(Line + offs * stride, mask=offs < end, other=0).to(tl.int32) >> bit) & 1
        slot = count + tl.associative_scan(flag, 0, ADD) - flag
        tl.store(Index + slot, offs.to(Index.dtype.element_ty), mask=flag != 0)
        count += tl.reduce(flag, 0, ADD)
    tl.store(Count, count)


@triton.jit
def tile_list_kernel(Mask, Counts, Index, Counts_t, Index_t, Col_first, Col_end, stride_mg, stride_mr, stride_mc,
                     num_rows, num_cols, width, width_t, CHUNK: tl.constexpr, PACKED: tl.constexpr,
                     SPANS: tl.constexpr):
    """``Mask`` (groups, rows, cols) uint8 with any strides, 0 or 1, or with ``PACKED`` (groups,
    rows, ceil(cols / 8)) bits (``block_mask.pack_tiles``). Programs with ``program_id(2) == 0``
    list rows: ``Counts`` (groups, rows) int32, the set entries per row, and ``Index`` (groups,
    rows, width) int16 or int32 (``index_dtype``), their column positions, ascending, in the first
    ``Counts`` slots of each row (the rest is left as it was; ``width``: at least the largest
    count). Programs with ``program_id(2) == 1`` (a grid of depth 2) list columns the same way into
    ``Counts_t`` (groups, cols) and ``Index_t`` (groups, cols, width_t): the backward needs both,
    from one launch. With ``SPANS``, column ``c`` is read in rows [``Col_first[c]``,
    ``Col_end[c]``) only (int32 per column, every group's; where the caller knows the other rows'
    entries are zero): a column's entries are a byte each a row apart, and under a window or
    causal mask most rows of a column hold none."""
    line = tl.program_id(0)
    group = tl.program_id(1)
    Mask = Mask + group.to(tl.int64) * stride_mg
    if tl.program_id(2) == 0:
        if line < num_rows:
            list_id = group.to(tl.int64) * num_rows + line
            list_true(Mask + line.to(tl.int64) * stride_mr, stride_mc, 0, num_cols, Counts + list_id,
                      Index + list_id * width, 0, CHUNK, PACKED)
    else:
        if line < num_cols:
            list_id = group.to(tl.int64) * num_cols + line
            if PACKED:
                column, bit = line >> 3, line & 7
            else:
                column, bit = line, 0
            first, end = 0, num_rows
            if SPANS:
                first = tl.load(Col_first + line)
                end = tl.minimum(tl.load(Col_end + line), num_rows)
            list_true(Mask + column.to(tl.int64) * stride_mc, stride_mr, first, end, Counts_t + list_id,
                      Index_t + list_id * width_t, bit, CHUNK, False)


@triton.jit
def pack_tiles_kernel(Tiles, Bits, num_bytes, num_cols, width, BLOCK: tl.constexpr):
    """``BLOCK`` bytes of ``Bits`` (rows of ``width`` uint8, ``block_mask.pack_tiles``'s layout:
    column ``8 j + i`` of a row in bit ``i`` of its byte ``j``) from ``Tiles`` (rows of ``num_cols``
    uint8 0 or 1, contiguous): each byte's eight columns loaded side by side and summed, shifted
    into place (distinct powers of two: no carry)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bits = offs < num_bytes
    bit = tl.arange(0, 8)
    col = (offs % width)[:, None] * 8 + bit[None, :]
    At = Tiles + (offs // width)[:, None] * num_cols + col
    tiles = tl.load(At, mask=in_bits[:, None] & (col < num_cols), other=0).to(tl.int32)
    tl.store(Bits + offs, tl.reduce(tiles << bit[None, :], 1, ADD).to(tl.uint8), mask=in_bits)


def pack_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """``block_mask.pack_tiles`` in one launch (``pack_tiles_kernel``): (..., nK) bool ->
    (..., ceil(nK / 8)) uint8, each mask entry read once; PyTorch's sum over the eight bits of
    each byte is a reduction along a short last axis (why: docs/design.md, autograd layer)."""
    num_cols = tiles.shape[-1]
    width = packed_width(num_cols)
    bits = torch.empty((*tiles.shape[:-1], width), device=tiles.device, dtype=torch.uint8)
    if bits.numel():
        launch(pack_tiles_kernel, (triton.cdiv(bits.numel(), PACK_BLOCK),))(
            Tiles=tiles.contiguous().view(torch.uint8), Bits=bits, num_bytes=bits.numel(), num_cols=num_cols,
            width=width, BLOCK=PACK_BLOCK, num_warps=4)
    return bits


def index_dtype(length: int) -> torch.dtype:
    """The dtype of a tile list over ``length`` tiles: int16 where every position fits (tiles of 64
    tokens: up to about two million tokens), else int32. The lists are the largest per-tile state
    a call holds (one entry per tile, listed or not), and the kernels widen what they read."""
    return torch.int16 if length <= torch.iinfo(torch.int16).max else torch.int32


def tile_lists(mask: torch.Tensor, columns_too: bool = False, packed_cols: int | None = None,
               column_spans: tuple | None = None) -> tuple:
    """(..., rows, cols) bool -> counts (..., rows) int32 and indices (..., rows, width) of
    ``index_dtype(cols)``: the True positions of each row first, ascending (slots past a row's
    count are unset). ``columns_too``: also the lists of the transposed mask, counts (..., cols)
    int32 and indices (..., cols, width_t) of ``index_dtype(rows)``, from the same launch. The
    widths are ``cols`` and ``rows``, or where those lists would be larger than
    ``COMPACT_LISTS_BYTES``, the longest row's count (``list_widths``). ``packed_cols``: ``mask``
    is (..., rows, ceil(packed_cols / 8)) uint8 bits of ``packed_cols`` columns
    (``block_mask.pack_tiles``), read as they are (no bool copy). ``column_spans``: ``(first,
    end)``, int32 (cols,) each: the column lists take rows [first, end) of each column only (the
    caller's promise: the others are zero in every group)."""
    packed = packed_cols is not None
    grouped = (mask if packed else mask.view(torch.uint8)).reshape(-1, *mask.shape[-2:])
    groups, rows = grouped.shape[:2]
    cols = packed_cols if packed else grouped.shape[2]
    width, width_t = list_widths(mask, columns_too, packed_cols)
    lead = mask.shape[:-2]
    lists = [torch.empty((*lead, rows), device=mask.device, dtype=torch.int32),
             torch.empty((*lead, rows, width), device=mask.device, dtype=index_dtype(cols))]
    if columns_too:
        lists += [torch.empty((*lead, cols), device=mask.device, dtype=torch.int32),
                  torch.empty((*lead, cols, width_t), device=mask.device, dtype=index_dtype(rows))]
    if lists[0].numel():
        columns = lists[2:] or lists  # unused by a grid of depth 1
        spans = column_spans is not None and columns_too
        if spans and any(t.shape != (cols,) or t.dtype != torch.int32 for t in column_spans):
            raise ValueError(f"column_spans must be two int32 tensors of shape ({cols},)")
        first, end = column_spans if spans else (lists[0], lists[0])  # unread without SPANS
        launch(tile_list_kernel, (max(rows, cols) if columns_too else rows, groups, 1 + columns_too))(
            Mask=grouped, Counts=lists[0], Index=lists[1], Counts_t=columns[0], Index_t=columns[1], Col_first=first,
            Col_end=end, stride_mg=grouped.stride(0), stride_mr=grouped.stride(1), stride_mc=grouped.stride(2),
            num_rows=rows, num_cols=cols, width=width, width_t=width_t,
            CHUNK=min(TILE_LIST_CHUNK, triton.next_power_of_2(max(rows, cols, 16))), PACKED=packed, SPANS=spans,
            num_warps=4)
    return tuple(lists)


def list_widths(mask: torch.Tensor, columns_too: bool, packed_cols: int | None = None) -> tuple[int, int]:
    """Slots per row of the lists of ``mask`` (..., rows, cols) and of its transpose: ``cols`` and
    ``rows`` (a slot per tile, nothing to wait for), or where those lists would take more than
    ``COMPACT_LISTS_BYTES``, the most True entries of any row (and column) rounded up to a multiple
    of 16 (at most ``cols`` and ``rows``): on sparse masks a small fraction. Reading them waits for
    the GPU, so not while a CUDA graph is captured. ``packed_cols``: as ``tile_lists``."""
    rows = mask.shape[-2]
    cols = mask.shape[-1] if packed_cols is None else packed_cols
    entries = mask.numel() // mask.shape[-1] * cols
    dense = entries * (index_dtype(cols).itemsize + (index_dtype(rows).itemsize if columns_too else 0))
    capturing = mask.is_cuda and torch.cuda.is_current_stream_capturing()
    if dense <= COMPACT_LISTS_BYTES or capturing or mask.numel() == 0:
        return cols, rows
    # int32 sums: a bool sum's default int64 result had torch widen the whole mask first
    if packed_cols is None:
        longest = [mask.sum(-1, dtype=torch.int32).max()]
        if columns_too:
            longest.append(mask.sum(-2, dtype=torch.int32).max())
    else:  # bits: per row their popcount; per column one bit position of every byte at a time
        longest = [popcount(mask).sum(-1, dtype=torch.int32).max()]
        if columns_too:
            longest.append(torch.stack([((mask >> i) & 1).sum(-2, dtype=torch.int32).max() for i in range(8)]).max())
    # a multiple of 16, so that the kernels see one specialization of the width whatever the data
    # (Triton compiles apart widths of 1 and multiples of 16); clamped: a dry run (compile_ahead)
    # lists a mask it never filled
    counts = torch.stack(longest).tolist()
    widths = [min(-(-max(int(n), 1) // 16) * 16, full) for n, full in zip(counts, (cols, rows))]
    return widths[0], (widths[1] if columns_too else rows)
