"""A float64 model of the one-launch Newton schedule (alpha 1.5), as it runs and with its second
sweep taken at the first sweep's upper bound of tau instead of at its Newton point: the sweeps
per query tile that each takes. CPU only; nothing here runs the kernels.

    python3 benchmarks/upper_point_model.py --family scattered --amp 0 --heads 2
    python3 benchmarks/upper_point_model.py --family captured --captured qkv.pt --amp 0 --heads 4

Per sampled query tile (every ``--every``-th, causal), the rows' z relative to their max, the
column floor as the schedule starts (``stats.column_tau``, or max - 1 where higher), then per
sweep the sums at each row's point, ``stats.newton_update``'s step and the closed form's upper
bound where ``triton_tau.newton_row_step`` takes it (the discriminant keeps half of f'^2). A
row stops where a step moves less than 1e-6, or exactly: from below (the schedule's stop, from
``stats.NEWTON_NARROW_STEP`` on) where no key lies between the point and the closed form's root
over the keys above it. The variant moves each row whose first sweep gave an upper bound to
that bound for its second sweep; at a point above tau the closed form over the keys above it
has its root below the point, and where no key lies between the two, that root is tau (the
support is then exactly the keys above the point): the same test from above, which needs the
largest key at or below the point where the schedule takes the smallest above it. A query tile
takes as many sweeps as its slowest row. The model leaves out what the kernels add (the tau
floor, float32 sums, the candidate keys) and counts sweeps, not time.
"""
import argparse

import torch

import inputs
from common import csv_list
from inputs import make_qkv
from ring_adasplash.kernels import stats
from ring_adasplash.kernels.entmax_spec import EntmaxSpec

TILE = 64
SPEC = EntmaxSpec(1.5)


def closed_form(z: torch.Tensor, t: torch.Tensor):
    """Sums at ``t`` over the keys above it and the closed form's root there (alpha 1.5: the
    quadratic sum_{z > t} (z - r)^2 = 1 in r): ``(f, f', root, valid, exact)``, ``valid`` where
    the schedule takes the root as an upper bound, ``exact`` where no key lies between t and root."""
    gap = (z - t[:, None]).clamp(min=0)
    f, df, n = (gap ** 2).sum(1), gap.sum(1), (gap > 0).sum(1).to(torch.float64)
    disc = df * df - n * (f - 1.0)
    x = (f - 1.0) / (df + disc.clamp(min=0).sqrt()).clamp(min=1e-300)
    root = t + x
    valid = (f >= 1.0) & (2.0 * disc >= df * df) & (n > 0)
    low, high = torch.minimum(t, root), torch.maximum(t, root)
    between = ((z > low[:, None]) & (z <= high[:, None])).sum(1)
    return f, df, root, valid, (between == 0) & (n > 0)


def schedule_sweeps(z: torch.Tensor, start: torch.Tensor, upper_second: bool, max_steps: int = 10) -> int:
    """Sweeps the query tile of rows ``z`` (64, keys; -inf where hidden) takes from ``start``."""
    t, lower, upper = start.clone(), start.clone(), torch.zeros_like(start)
    done = torch.zeros(start.shape, dtype=torch.bool)
    above_tau = torch.zeros(start.shape, dtype=torch.bool)  # rows whose point is the upper bound
    for step in range(max_steps):
        f, df, root, valid, exact = closed_form(z, t)
        exact = torch.where(above_tau, exact & (f < 1.0), valid & exact & (step >= stats.NEWTON_NARROW_STEP))
        point, lower, upper = stats.newton_update(t, lower, upper, torch.stack([f, df], -1), SPEC)
        upper = torch.where(valid, torch.minimum(upper, root), upper)
        above_tau = torch.zeros_like(above_tau)
        if upper_second and step == 0:
            above_tau = valid & (upper < 0.0)
            point = torch.where(above_tau, upper, point)
        done = done | exact | ((point - t).abs() < 1e-6)
        if done.all():
            return step + 1
        t = torch.where(done, t, point)
    return max_steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(inputs.FAMILIES), default="scattered", help="input family (inputs.py)")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture (--family captured)")
    p.add_argument("--seqlen", type=int, default=8192, help="tokens")
    p.add_argument("--heads", type=int, default=2, help="heads modelled (the captured family: its heads, 4)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--amps", type=csv_list(float), default=[0.0, 1.0], help="amplitudes (captured: layers)")
    p.add_argument("--every", type=int, default=6, help="every this many query tiles, from the fifth")
    args = p.parse_args()
    inputs.CAPTURED_PATH = args.captured
    print("| input | query tiles | sweeps now: mean, max | second sweep at the upper bound: mean, max |")
    print("|---|---|---|---|")
    for amp in args.amps:
        q, k, _ = make_qkv(args.family, 1, args.seqlen, args.heads, args.head_dim, amp, torch.float32, "cpu")
        scale_z = (SPEC.alpha - 1.0) / args.head_dim ** 0.5
        counts = {False: [], True: []}
        for h in range(q.shape[2]):
            for tile in range(4, args.seqlen // TILE, args.every):
                rows = torch.arange(tile * TILE, (tile + 1) * TILE)
                keys = (tile + 1) * TILE
                z = (q[0, rows, h].double() @ k[0, :keys, h].double().T) * scale_z
                z = z.masked_fill(torch.arange(keys)[None, :] > rows[:, None], float("-inf"))
                z = z - z.amax(1, keepdim=True)
                floor = stats.column_tau(z.view(TILE, -1, TILE).amax(1), SPEC)
                start = torch.maximum(floor, torch.full_like(floor, -1.0))
                for variant in counts:
                    counts[variant].append(schedule_sweeps(z, start, variant))
        cells = [f"{sum(c) / len(c):.2f}, {max(c)}" for c in counts.values()]
        print(f"| {args.family} {args.seqlen}, D {args.head_dim}, amp {amp:g} | {len(counts[False])} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
