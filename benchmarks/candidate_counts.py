"""How many candidate keys the rows of a query tile hold, against the candidate kernel's slots (CPU).

    python benchmarks/candidate_counts.py --family structured --seqlen 32768 --head-dim 64 --amp 1.0 --heads 0,7
    python benchmarks/candidate_counts.py --family captured --captured qkv.pt --seqlen 8192 --amp 0 --heads 0,1,2,3

The candidate kernel (``kernels/triton_candidates.py``) keeps, per row, the keys with
z > reference - margin, the reference being max(tau floor, row max - 1), in ``CANDIDATES`` slots;
a query tile with a row of more candidates spills to the Newton sweeps after its gather sweep has
been paid. This counts, per query tile (causal, 64 x 64 tiles, every ``--every``-th query tile
from the last), the largest number of candidates of one of its rows, and the largest support
(keys with p > 0), in float64 from the inputs alone: tau by the reference's bisection, the
floor as the tau of the row's keys in its last two key tiles (the floor the max pass takes, here
exact: the kernel's Newton steps from below may stop under it, so the kernel can count a few
more). alpha 1.5.

It also counts what a second gather would hold: where a row has more candidates than the slots,
the tau of the slots' worth of them nearest the diagonal (a subset of the keys: a lower bound of
tau) raises the row's reference, and the keys above it are counted again. And what a gather
without the max pass before it would hold ("one sweep"): the same sweep of the key tiles, in the
kernel's order (the diagonal tile, then the others from the first), taking the row max as it
goes, each tile's keys compared with max(tau floor, the max so far - 1) - margin.

And how the candidate kernel's sample (``triton_backend.SAMPLE_TILES`` of a query tile's listed
tiles with every pair visible, from ``SAMPLE_FROM`` of them) sorts the query tiles: those whose
fullest row holds more candidates than its limit (the greater of ``CROWDED_FLOOR`` and its listed
keys / ``CROWDED_RATIO``, at most ``--slots``), which spill after their gather; those the sample
sends to the sweeps before it; and those it sends there that would not have spilled. Listed tiles
here: the tiles where some row has a candidate. The query tiles left (kept: their rows' Newton
steps and output run on the candidates), their fullest rows' candidates (median, max) and how many
hold more than 256: each step and the output walk the fullest row's slots for every row.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import inputs  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402
from ring_adasplash.kernels import EntmaxSpec, triton_backend  # noqa: E402
from ring_adasplash.kernels.stats import MASK_MARGIN  # noqa: E402
from ring_adasplash.reference import entmax_bisect  # noqa: E402

BLOCK = 64  # query and key tile of the kernels
SLOTS = (256, 512, 1024)  # candidate slots per row to report the spill fraction at


def tau_alpha_15(z: torch.Tensor) -> torch.Tensor:
    """Per row of ``z`` (rows, keys) float64 with -inf for hidden keys: tau at alpha 1.5
    (``reference.entmax_bisect``)."""
    return entmax_bisect(z, 1.5, z > float("-inf"))[1]


def one_sweep_candidates(z: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Per row of one query tile's ``z`` (rows, keys: whole key tiles, the diagonal one last),
    the candidates of a gather that takes the row max as it sweeps the key tiles (the diagonal
    tile first, then the others from the first), against max(``floor``, max so far - 1) - margin."""
    tiles = z.view(z.shape[0], -1, BLOCK)
    order = torch.cat([tiles[:, -1:], tiles[:, :-1]], 1)
    running = order.amax(2).cummax(1).values
    cutoff = torch.maximum(floor[:, None], running - 1.0) - MASK_MARGIN
    return (order > cutoff[:, :, None]).sum((1, 2))


def sampled_route(candidate: torch.Tensor, tile: int, slots: int) -> tuple:
    """``(spills, sampled out)`` of one query tile (``tile``, causal) whose rows' candidates are
    ``candidate`` (rows, keys: whole key tiles, the diagonal one last): whether its fullest row
    holds more than its limit, and whether the candidate kernel's sample sends it to the sweeps
    after the first tiles of its gather (``triton_candidates.spread_slot``)."""
    listed = candidate.view(candidate.shape[0], -1, BLOCK).any(2).any(0)
    count = int(listed.sum())
    limit = slots
    if triton_backend.CROWDED_RATIO:
        limit = min(slots, max(count * BLOCK // triton_backend.CROWDED_RATIO, triton_backend.CROWDED_FLOOR))
    spills = int(candidate.sum(1).max()) > limit
    full = [t for t in range(tile) if listed[t]]  # causal: every tile but the diagonal one
    sample, start = triton_backend.SAMPLE_TILES, max(triton_backend.SAMPLE_FROM, triton_backend.SAMPLE_TILES, 1)
    if not sample or len(full) < start:
        return spills, False
    spacing = len(full) // sample
    seen = sum(candidate[:, full[i * spacing] * BLOCK:(full[i * spacing] + 1) * BLOCK].sum(1) for i in range(sample))
    return spills, int(seen.max()) * count > triton_backend.SAMPLE_MARGIN * limit * sample


def tile_counts(q: torch.Tensor, k: torch.Tensor, scale_z: float, every: int, slots: int, kernel_slots: int = 1024):
    """``(most candidates, most support, most candidates after a second gather, most candidates
    of one sweep, spills, sampled out)`` of one row, per query tile taken, for one head's ``q``,
    ``k`` (seqlen, head_dim); the second gather's reference from the ``slots`` candidates nearest
    the diagonal; one sweep: ``one_sweep_candidates``; the last two: ``sampled_route`` at
    ``kernel_slots``."""
    seqlen = q.shape[0]
    most_candidates, most_support, most_regathered, most_one_sweep, spills, sampled = [], [], [], [], [], []
    for tile in range(seqlen // BLOCK - 1, -1, -every):
        rows = torch.arange(tile * BLOCK, (tile + 1) * BLOCK)
        keys = torch.arange((tile + 1) * BLOCK)
        scores = q[rows].float() @ k[keys].float().T
        scores = torch.where(keys[None, :] <= rows[:, None], scores, float("-inf"))
        z = (scores - scores.max(1, keepdim=True).values).double() * scale_z
        floor = tau_alpha_15(z[:, max(0, (tile - 1) * BLOCK):])  # the last two key tiles
        reference = torch.clamp(floor, min=-1.0)
        candidate = z > (reference - MASK_MARGIN)[:, None]
        most_candidates.append(int(candidate.sum(1).max()))
        most_support.append(int((z > tau_alpha_15(z)[:, None]).sum(1).max()))
        # the first ``slots`` candidates from the diagonal back, the others hidden: their tau
        nearest = candidate & (candidate.flip(1).cumsum(1).flip(1) <= slots)
        subset_tau = tau_alpha_15(torch.where(nearest, z, float("-inf")))
        raised = torch.where(candidate.sum(1) > slots, torch.maximum(reference, subset_tau), reference)
        most_regathered.append(int((z > (raised - MASK_MARGIN)[:, None]).sum(1).max()))
        most_one_sweep.append(int(one_sweep_candidates(z, floor).max()))
        spill, out = sampled_route(candidate, tile, kernel_slots)
        spills.append(spill)
        sampled.append(out)
    return (torch.tensor(most_candidates), torch.tensor(most_support), torch.tensor(most_regathered),
            torch.tensor(most_one_sweep), torch.tensor(spills), torch.tensor(sampled))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured", help="input family (inputs.py)")
    p.add_argument("--seqlen", type=int, default=32768, help="sequence length (a multiple of 64)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--amp", type=float, default=1.0, help="input amplitude (sparsity)")
    p.add_argument("--heads", default="0", help="comma-separated heads (of 16, or of the capture's) to count")
    p.add_argument("--every", type=int, default=4, help="count every N-th query tile")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured "
                                                     "(amp is then the layer; its first sequence is counted)")
    args = p.parse_args()
    if args.seqlen % BLOCK:
        p.error(f"--seqlen must be a multiple of {BLOCK}; got {args.seqlen}")
    if args.every < 1:
        p.error(f"--every must be at least 1; got {args.every}")
    inputs.CAPTURED_PATH = args.captured
    heads = None if args.family == "captured" else 16  # None: the capture's
    q, k, _ = make_qkv(args.family, 1, args.seqlen, heads, args.head_dim, args.amp, torch.bfloat16, "cpu")
    scale_z = EntmaxSpec(1.5).scale_z(args.head_dim ** -0.5)
    common.print_header("cpu", {"family": args.family, "seqlen": args.seqlen, "head_dim": args.head_dim,
                                "amp": args.amp, "alpha": 1.5, "every": args.every, "captured": args.captured})
    print("\n| head | query tiles | most candidates of a row: median | p90 | max | "
          + " | ".join(f"tiles over {s}" for s in SLOTS) + " | most support: median | max "
          f"| second gather ({SLOTS[0]} slots): most candidates median | max | tiles over {SLOTS[0]} "
          f"| one sweep: most candidates median | p90 | max | tiles over {SLOTS[-1]} "
          "| spill at the limit | sampled out | sampled out, no spill | kept | kept: most candidates median | max "
          "| kept over 256 |")
    print("|---" * (21 + len(SLOTS)) + "|")
    for head in (int(h) for h in args.heads.split(",")):
        candidates, support, regathered, one_sweep, spills, sampled = tile_counts(
            q[0, :, head], k[0, :, head], scale_z, args.every, SLOTS[0], SLOTS[-1])
        over = " | ".join(f"{(candidates > s).float().mean():.3f}" for s in SLOTS)
        print(f"| {head} | {len(candidates)} | {int(candidates.median())} | {int(candidates.float().quantile(0.9))} | "
              f"{int(candidates.max())} | {over} | {int(support.median())} | {int(support.max())} | "
              f"{int(regathered.median())} | {int(regathered.max())} | {(regathered > SLOTS[0]).float().mean():.3f} | "
              f"{int(one_sweep.median())} | {int(one_sweep.float().quantile(0.9))} | {int(one_sweep.max())} | "
              f"{(one_sweep > SLOTS[-1]).float().mean():.3f} | {int(spills.sum())} | {int(sampled.sum())} | "
              f"{int((sampled & ~spills).sum())} | {kept_columns(candidates[~spills & ~sampled])} |", flush=True)


def kept_columns(kept: torch.Tensor) -> str:
    """``kept | median | max | over 256`` of the kept query tiles' fullest rows' candidates."""
    if not len(kept):
        return "0 | - | - | 0"
    return f"{len(kept)} | {int(kept.median())} | {int(kept.max())} | {int((kept > 256).sum())}"


if __name__ == "__main__":
    main()
