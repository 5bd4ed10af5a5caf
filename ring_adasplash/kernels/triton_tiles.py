"""Compact tile lists: per row of a block mask, the positions of its True entries.

Every sparse pass visits, per program, the key tiles (or query tiles) its row of the mask lists,
as FlexAttention's ``kv_num_blocks`` / ``kv_indices``. One program per row walks it in chunks:
a prefix sum of the chunk's flags gives each True entry its slot. (A stable sort of each row did
the same in four launches and about 0.1 ms a pass at 32K tokens and 16 heads.)
"""
import triton
import triton.language as tl

from .triton_stats import ADD


@triton.jit
def list_true(Line, stride, length, Count, Index, CHUNK: tl.constexpr):
    """The positions of the nonzero entries of ``Line[0:length:stride]``, ascending, into
    ``Index[:count]``; their number into ``Count``."""
    count = 0
    for start in range(0, length, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        flag = (tl.load(Line + offs * stride, mask=offs < length, other=0) != 0).to(tl.int32)
        slot = count + tl.associative_scan(flag, 0, ADD) - flag
        tl.store(Index + slot, offs, mask=flag != 0)
        count += tl.reduce(flag, 0, ADD)
    tl.store(Count, count)


@triton.jit
def tile_list_kernel(Mask, Counts, Index, Counts_t, Index_t, stride_mg, stride_mr, stride_mc, num_rows, num_cols,
                     CHUNK: tl.constexpr):
    """``Mask`` (groups, rows, cols) uint8 with any strides. Programs with ``program_id(2) == 0``
    list rows: ``Counts`` (groups, rows) int32, the True entries per row, and ``Index`` (groups,
    rows, cols) int32, their column positions, ascending, in the first ``Counts`` slots of each row
    (the rest is left as it was). Programs with ``program_id(2) == 1`` (a grid of depth 2) list
    columns the same way into ``Counts_t`` (groups, cols) and ``Index_t`` (groups, cols, rows): the
    backward needs both, from one launch."""
    line = tl.program_id(0)
    group = tl.program_id(1)
    Mask = Mask + group.to(tl.int64) * stride_mg
    if tl.program_id(2) == 0:
        if line < num_rows:
            list_id = group.to(tl.int64) * num_rows + line
            list_true(Mask + line.to(tl.int64) * stride_mr, stride_mc, num_cols, Counts + list_id,
                      Index + list_id * num_cols, CHUNK)
    else:
        if line < num_cols:
            list_id = group.to(tl.int64) * num_cols + line
            list_true(Mask + line.to(tl.int64) * stride_mc, stride_mr, num_rows, Counts_t + list_id,
                      Index_t + list_id * num_rows, CHUNK)
