"""How many sweeps the Newton schedule runs, per query tile and per row, on the input families.

    python3 benchmarks/newton_sweeps.py --family scattered --seqlen 8192 --heads 2
    python3 benchmarks/newton_sweeps.py --family structured --seqlen 8192 --amps 1.0,2.0
    python3 benchmarks/newton_sweeps.py --family captured --captured qkv.pt --heads 4 --amps 0,1

Runs one forward of ``adasplash_func`` on the PyTorch backend (any device; a CPU is enough) with
``RING_ADASPLASH_SCHEDULE=newton`` and records, at every sweep of the schedule
(``torch_blockwise.newton_moments_pass``, the step-for-step spec of the one-launch kernel), which
rows were still live. A query tile's kernel program sweeps all its listed tiles while any of its
rows is live, so the sweeps per query tile, not per row, are what a forward pays on the GPU; the
spread between the two is what a per-row exact finish could save at most.

The sweeps are counted from the schedule's start, the column floor (``torch_blockwise.column_floor``),
the sweep of maxima before them not included. The table also counts each row's *candidates* (the
keys with z > point - MASK_MARGIN, which a gather above that point would store) at the max pass's
bound, where the Triton backend's candidate kernel gathers, at the start and at the points of the
first two sweeps: per query tile its fullest row, the median over the query tiles. Where the count
at the bound passes the candidate slots, a query tile spills to the sweeps; the later counts are
what it would gather from there.
"""
import argparse
import os

import torch

import inputs
from common import csv_list, print_header, torch_dtype
from inputs import FAMILIES, make_qkv
from ring_adasplash import adasplash_func, telemetry
from ring_adasplash.kernels import stats, torch_blockwise
from ring_adasplash.kernels.algorithm import SCHEDULE_ENV
from ring_adasplash.kernels.backend import BACKEND_ENV

TILE = 64  # query rows per tile of the kernels


def sweeps(family, seqlen, heads, head_dim, amp, dtype, device, seed):
    """(per query tile: sweeps (B, H, nQ); per row: sweeps (B, H, Sq); block sparsity; at the max
    pass's bound and at the points of the sweeps up to CANDIDATE_SWEEPS, the median over the query
    tiles of their fullest row's candidates)."""
    q, k, v = make_qkv(family, 1, seqlen, heads, head_dim, amp, dtype, device, seed=seed)
    live_rows, points, bounds = [], [], []
    moments_pass, column_floor = torch_blockwise.newton_moments_pass, torch_blockwise.column_floor

    def recording(problem, tiles, point, rows=None, **options):
        live_rows.append(rows.clone())
        points.append(point.clone())
        return moments_pass(problem, tiles, point, rows, **options)

    def recording_bound(problem, tiles, reference, row_max):
        bounds.append(reference.clone())
        return column_floor(problem, tiles, reference, row_max)

    torch_blockwise.newton_moments_pass, torch_blockwise.column_floor = recording, recording_bound
    try:
        with torch.no_grad(), telemetry.record() as t:
            adasplash_func(q, k, v, alpha=1.5, causal=True)
    finally:
        torch_blockwise.newton_moments_pass, torch_blockwise.column_floor = moments_pass, column_floor
    live = torch.stack(live_rows)  # (sweeps, B, H, Sq)
    padded = torch.nn.functional.pad(live, (0, -seqlen % TILE))
    per_tile = padded.unflatten(-1, (-1, TILE)).any(-1).sum(0)
    fullest = candidates(q, k, torch.stack(bounds + points[:CANDIDATE_SWEEPS]))  # (1 + sweeps, B, H, nQ)
    return per_tile, live.sum(0), t.block_sparsity, fullest.flatten(1).float().median(-1).values


CANDIDATE_SWEEPS = 3  # the points of the first sweeps at which the candidates are counted
CHUNK = 512  # query rows per chunk of scores: O(CHUNK x S) memory, not O(S^2)


def candidates(q, k, points):
    """Per sweep (the rows' points ``points`` (sweeps, B, H, Sq)) and query tile, the most keys with
    z > point - MASK_MARGIN in one of its rows (causal, alpha 1.5, softmax scale 1/sqrt(D), z relative
    to the row's largest score, float64): (sweeps, B, H, nQ)."""
    batch, seqlen, heads, head_dim = q.shape
    scale = 0.5 * head_dim ** -0.5  # (alpha - 1) times the softmax scale
    counts = torch.zeros(points.shape, dtype=torch.long, device=points.device)
    keys = torch.arange(seqlen, device=q.device)
    for b in range(batch):
        for h in range(heads):
            kh = k[b, :, h * k.shape[2] // heads].double()
            for start in range(0, seqlen, CHUNK):
                rows = torch.arange(start, min(start + CHUNK, seqlen), device=q.device)
                s = (q[b, rows, h].double() @ kh.T).masked_fill(keys[None, :] > rows[:, None], float("-inf"))
                z = scale * (s - s.amax(-1, keepdim=True))
                for e, point in enumerate(points[:, b, h, rows].double()):
                    counts[e, b, h, rows] = (z > (point - stats.MASK_MARGIN)[:, None]).sum(-1)
    padded = torch.nn.functional.pad(counts, (0, -seqlen % TILE))
    return padded.unflatten(-1, (-1, TILE)).amax(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="scattered", help="input family of inputs.py")
    p.add_argument("--seqlen", type=int, default=8192, help="sequence length (tokens)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--heads", type=int, default=2, help="query heads")
    p.add_argument("--amps", type=csv_list(float), default=[1.0], help="amplitudes, comma-separated (higher: sparser)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="input dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    p.add_argument("--device", default="cpu", help="device (the PyTorch backend runs on any)")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured "
                                                     "(amp is then the layer; its first sequence is run)")
    args = p.parse_args()
    inputs.CAPTURED_PATH = args.captured
    os.environ[SCHEDULE_ENV] = "newton"
    os.environ[BACKEND_ENV] = "torch"
    device = torch.device(args.device)
    print_header(str(device), vars(args))
    print("| family | S | D | amp | block sparsity | sweeps per query tile: mean | max | sweeps per row: mean | max "
          "| candidates at the bound, the start, after 1 and 2 sweeps (median of the query tiles' fullest rows) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for amp in args.amps:
        per_tile, per_row, sparsity, fullest = sweeps(args.family, args.seqlen, args.heads, args.head_dim, amp,
                                                      torch_dtype(args.dtype), device, args.seed)
        print(f"| {args.family} | {args.seqlen} | {args.head_dim} | {amp:g} | {sparsity:.3f} | "
              f"{per_tile.float().mean():.2f} | {int(per_tile.max())} | {per_row.float().mean():.2f} | "
              f"{int(per_row.max())} | {', '.join(f'{c:.0f}' for c in fullest.tolist())} |")


if __name__ == "__main__":
    main()
