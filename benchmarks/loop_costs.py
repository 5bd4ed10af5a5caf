"""What one key-tile loop costs, part by part: the per-tile work of the sparse passes, isolated.

    python benchmarks/loop_costs.py

One program per (query tile, head) walks key tiles 0..its own (causal), 16 heads, 32K tokens,
D 64, bf16, 64 x 64 tiles; each variant adds one thing to a loop of Q.K^T and two row sums of
``(z - t)_+`` terms: ``listed`` reads the key tile from an index list (the sparse passes' tile
lists), ``branch`` takes a masked path on the diagonal tile as ``triton_common.tile_logits``
does, ``keep`` stores a per-tile flag from a reduction over the whole tile, ``4red`` adds a
count and a minimum as two more row reductions, ``defer`` keeps the sums as 64 x 64 tiles and
reduces them once. ``max_like`` is the max pass's loop (one row max). Medians of
``triton.testing.do_bench`` in ms. Used to choose what the Newton schedule's pass computes
(docs/design.md, section 7).
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def loop_kernel(Q, K, Index, Out, Keep, S, nk, scale, BLOCK: tl.constexpr, D: tl.constexpr,
                LISTED: tl.constexpr, BRANCH: tl.constexpr, KEEP: tl.constexpr, DEFER: tl.constexpr,
                NRED: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = m * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    q = tl.load(Q + bh * S * D + offs_m[:, None] * D + d[None, :])
    Kh = K + bh * S * D
    point = tl.full([BLOCK], -0.5, tl.float32)
    f = tl.full([BLOCK], 0.0, tl.float32)
    df = tl.full([BLOCK], 0.0, tl.float32)
    c = tl.full([BLOCK], 0.0, tl.float32)
    f_tile = tl.full([BLOCK, BLOCK], 0.0, tl.float32)
    df_tile = tl.full([BLOCK, BLOCK], 0.0, tl.float32)
    for j in range(0, m + 1):
        if LISTED:
            tile_k = tl.load(Index + m * nk + j)
        else:
            tile_k = j
        offs_n = tile_k * BLOCK + tl.arange(0, BLOCK)
        if BRANCH:
            if tile_k < m:
                s = tl.dot(q, tl.load(Kh + offs_n[None, :] * D + d[:, None]))
            else:
                s = tl.dot(q, tl.load(Kh + offs_n[None, :] * D + d[:, None], mask=offs_n[None, :] < S, other=0.0))
                s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        else:
            s = tl.dot(q, tl.load(Kh + offs_n[None, :] * D + d[:, None]))
        z = s * scale
        gap = tl.maximum(z - point[:, None], 0.0)
        if DEFER:
            f_tile += gap * gap
            df_tile += gap
        else:
            f += tl.sum(gap * gap, 1)
            df += tl.sum(gap, 1)
            if NRED >= 3:
                c += tl.sum((gap > 0).to(tl.float32), 1)
            if NRED >= 4:
                c += tl.min(tl.where(gap > 0, gap, float("inf")), 1)
        if KEEP:
            near = tl.max(tl.max(z - point[:, None], 1), 0) > 0
            tl.store(Keep + (bh * nk + m) * nk + tile_k, near.to(tl.int8))
    if DEFER:
        f = tl.sum(f_tile, 1)
        df = tl.sum(df_tile, 1)
    tl.store(Out + bh * S + offs_m, f + df + c)


@triton.jit
def max_like_kernel(Q, K, Out, S, BLOCK: tl.constexpr, D: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = m * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    q = tl.load(Q + bh * S * D + offs_m[:, None] * D + d[None, :])
    Kh = K + bh * S * D
    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for j in range(0, m + 1):
        offs_n = j * BLOCK + tl.arange(0, BLOCK)
        row_max = tl.maximum(row_max, tl.max(tl.dot(q, tl.load(Kh + offs_n[None, :] * D + d[:, None])), 1))
    tl.store(Out + bh * S + offs_m, row_max)


VARIANTS = {
    "plain 2red": dict(LISTED=False, BRANCH=False, KEEP=False, DEFER=False, NRED=2),
    "listed 2red": dict(LISTED=True, BRANCH=False, KEEP=False, DEFER=False, NRED=2),
    "listed branch": dict(LISTED=True, BRANCH=True, KEEP=False, DEFER=False, NRED=2),
    "plain branch": dict(LISTED=False, BRANCH=True, KEEP=False, DEFER=False, NRED=2),
    "listed keep": dict(LISTED=True, BRANCH=False, KEEP=True, DEFER=False, NRED=2),
    "listed 4red": dict(LISTED=True, BRANCH=False, KEEP=False, DEFER=False, NRED=4),
    "listed defer": dict(LISTED=True, BRANCH=False, KEEP=False, DEFER=True, NRED=2),
    "all (listed branch keep 4red)": dict(LISTED=True, BRANCH=True, KEEP=True, DEFER=False, NRED=4),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=32768, help="tokens")
    p.add_argument("--heads", type=int, default=16, help="heads")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    args = p.parse_args()
    seqlen, heads, dim, block = args.seqlen, args.heads, args.head_dim, 64
    tiles = seqlen // block
    q = torch.randn(heads, seqlen, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(heads, seqlen, dim, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(tiles, device="cuda", dtype=torch.int32).repeat(heads * tiles, 1).contiguous()
    out = torch.empty(heads, seqlen, device="cuda")
    keep = torch.zeros(heads * tiles * tiles, device="cuda", dtype=torch.int8)
    grid = (tiles, heads)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{seqlen} tokens, {heads} heads, D {dim}, bf16, causal tiles")
    for warps, stages in ((4, 2), (4, 3)):
        ms = do_bench(lambda: max_like_kernel[grid](q, k, out, seqlen, BLOCK=block, D=dim, num_warps=warps,
                                                    num_stages=stages))
        print(f"{warps} warps, {stages} stages: max_like {ms:.3f} ms")
        for name, flags in VARIANTS.items():
            ms = do_bench(lambda: loop_kernel[grid](q, k, index, out, keep, seqlen, tiles, 0.0625, BLOCK=block, D=dim,
                                                    num_warps=warps, num_stages=stages, **flags))
            print(f"  {name}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
