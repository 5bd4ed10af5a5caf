"""Could the dense max pass be skipped on some tiles? Tiles that per-key-tile score bounds prove zero.

    python benchmarks/bound_pruning.py --seqlen 4096 --head-dims 64,128

No probability exceeds 1, so every key with ``z <= tau`` has p = 0 and ``tau >= max(tau floor,
z_max - 1)``. Before any far tile is read, the keys of the last two key tiles of a query tile's
span (causal: the diagonal and the tile before) give both a tau floor and a lower bound of z_max
(``torch_blockwise.nearest_tau_floor``); call their larger lower bound of tau the *reference*. A
key tile whose upper bound of z stays at or below the reference on every row of a query tile
holds only p = 0 and needs no pass at all, not even the max pass. Two upper bounds of ``q . k``
over the keys of a tile, from per-key-tile statistics computed in O(S * D):

    box   sum_d max(q_d min_j k_jd, q_d max_j k_jd)       (per-dimension min and max of the keys)
    ball  q . c + |q| max_j |k_j - c|                       (c the keys' mean)

Reported per case, as fractions of the visible (query tile, key tile) pairs of one head:
``box`` and ``ball``, the tiles each bound proves zero, and the median over (row, far key tile)
of how far the bound lies above the reference, in z (a tile is proved zero only at <= 0; the
entmax support of a row spans at most 1 in z); ``max known``, the tiles whose every key
lies at or below the same reference taken with the exact row max (what the dense max pass lets the
later passes skip); ``zero``, the tiles with no p > 0 (the block sparsity). Runs on CPU in float64.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402
from ring_adasplash.kernels import torch_blockwise as TBW  # noqa: E402
from ring_adasplash.kernels.visibility import causal_visibility  # noqa: E402
from ring_adasplash.reference import entmax_bisect  # noqa: E402

ALPHA = 1.5
TILE = 64


def tile_fractions(q, k, scale_z, tau_floor):
    """Fractions of visible tiles proved zero, for one head: q, k (S, D) float64, tau_floor (S,)."""
    seqlen, dim = q.shape
    tiles = seqlen // TILE
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    z = (q @ k.T * scale_z).masked_fill(~visible, float("-inf"))
    tile_of = torch.arange(seqlen) // TILE
    near = (tile_of[None, :] >= tile_of[:, None] - 1) & visible  # the last two key tiles of the span
    reference = torch.maximum(tau_floor, z.masked_fill(~near, float("-inf")).amax(-1) - 1.0)
    exact = torch.maximum(tau_floor, z.amax(-1) - 1.0)

    keys = k.view(tiles, TILE, dim)
    low, high = keys.amin(1), keys.amax(1)
    box = (q.clamp(min=0) @ high.T + q.clamp(max=0) @ low.T) * scale_z  # (S, tiles)
    centre = keys.mean(1)
    radius = (keys - centre[:, None]).norm(dim=-1).amax(1)
    ball = (q @ centre.T + q.norm(dim=-1, keepdim=True) * radius[None]) * scale_z

    visible_tiles = torch.ones(tiles, tiles, dtype=torch.bool).tril()
    # bounds are compared off the diagonal only: the tiles the reference is taken from are read anyway
    diagonal = torch.eye(tiles, dtype=torch.bool)
    off_diagonal = visible_tiles & ~diagonal & ~diagonal.roll(1, 0)  # nor the tile before it

    def by_bound(bound):
        zero_rows = bound <= reference[:, None]
        return (zero_rows.view(tiles, TILE, tiles).all(1) & off_diagonal).sum() / visible_tiles.sum()

    def excess(bound):  # median of how far the bound lies above the reference, in z
        rows_of = off_diagonal[tile_of]  # (S, tiles): the row's query tile against each key tile
        return (bound - reference[:, None])[rows_of].median()

    def by_keys(threshold):
        below = (z <= threshold[:, None]) | ~visible
        return (below.view(tiles, TILE, tiles, TILE).all(3).all(1) & visible_tiles).sum() / visible_tiles.sum()

    tau = entmax_bisect(z, ALPHA, visible)[1]
    return {"box": by_bound(box).item(), "ball": by_bound(ball).item(),
            "box excess": excess(box).item(), "ball excess": excess(ball).item(),
            "max known": by_keys(exact).item(), "zero": by_keys(tau).item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--head-dims", type=common.csv_list(int), default=[64, 128])
    p.add_argument("--heads", type=int, default=2, help="heads measured (fractions are their mean)")
    p.add_argument("--cases", default="structured:1.5,structured:2.0,sinkwindow:1.0",
                   help="family:amp pairs (families: %s)" % ", ".join(sorted(FAMILIES)))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.seqlen % TILE:
        raise ValueError(f"--seqlen must be a multiple of {TILE}; got {args.seqlen}")
    header = common.print_header("cpu")
    vis = causal_visibility(args.seqlen, args.seqlen, True, "cpu")
    rows = []
    for case in args.cases.split(","):
        family, amp = case.split(":")
        for dim in args.head_dims:
            q, k, _ = make_qkv(family, 1, args.seqlen, args.heads, dim, float(amp), torch.float64, "cpu")
            scale_z = (ALPHA - 1.0) / math.sqrt(dim)
            floor = TBW.nearest_tau_floor(q, k, vis, scale_z, TILE, TILE, ALPHA).double()
            parts = [tile_fractions(q[0, :, h], k[0, :, h], scale_z, floor[0, h]) for h in range(args.heads)]
            row = {"family": family, "S": args.seqlen, "D": dim, "amp": float(amp)}
            row.update({key: round(sum(part[key] for part in parts) / len(parts), 3) for key in parts[0]})
            rows.append(row)
            print(row, flush=True)
    columns = [("family", "family", "s"), ("S", "S", "d"), ("D", "D", "d"), ("amp", "amp", ".1f"),
               ("box", "box", ".3f"), ("ball", "ball", ".3f"), ("box excess", "box: median excess (z)", ".2f"),
               ("ball excess", "ball: median excess (z)", ".2f"), ("max known", "max known", ".3f"),
               ("zero", "zero (block sparsity)", ".3f")]
    table = common.markdown_table(rows, columns)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bound_pruning_{common.timestamp()}.md")
    with open(path, "w") as f:
        f.write(header + "\n\n" + table + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
