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
def tile_list_kernel(Mask, Counts, Index, stride_mg, stride_mr, stride_mc, num_rows, num_cols,
                     CHUNK: tl.constexpr):
    """``Mask`` (groups, rows, cols) uint8 with any strides -> ``Counts`` (groups, rows) int32, the
    True entries per row, and ``Index`` (groups, rows, cols) int32, their column positions,
    ascending, in the first ``Counts`` slots of each row (the rest is left as it was)."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    Mask = Mask + group.to(tl.int64) * stride_mg + row.to(tl.int64) * stride_mr
    list_id = group.to(tl.int64) * num_rows + row
    Index = Index + list_id * num_cols
    count = 0
    for start in range(0, num_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        flag = (tl.load(Mask + cols * stride_mc, mask=cols < num_cols, other=0) != 0).to(tl.int32)
        slot = count + tl.associative_scan(flag, 0, ADD) - flag
        tl.store(Index + slot, cols, mask=flag != 0)
        count += tl.reduce(flag, 0, ADD)
    tl.store(Counts + list_id, count)
