"""Time each pass of the forward on one GPU, and the share of visible tiles each pass reads.

    python benchmarks/profile_passes.py --seqlens 8192,32768 --head-dim 64 --amps 1.5,2.0
    python benchmarks/profile_passes.py --family sinkwindow --seqlens 8192 --head-dim 64 --amps 0.5,1.0

Replays the steps of ``kernels/algorithm.entmax_forward`` (one key block, alpha 1.5) through the
Triton backend and times each with ``triton.testing.do_bench`` (median ms, launches and the small
PyTorch ops of the step included). Tile shares are of the visible (query tile, key tile) pairs.
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402
from ring_adasplash import adasplash_func  # noqa: E402
from ring_adasplash.kernels import algorithm as A  # noqa: E402
from ring_adasplash.kernels import stats as S  # noqa: E402
from ring_adasplash.kernels import triton_backend as TB  # noqa: E402
from ring_adasplash.kernels.visibility import causal_visibility  # noqa: E402

ALPHA = 1.5


def profile(seqlen, head_dim, heads, amp, family="structured"):
    q, k, v = make_qkv(family, 1, seqlen, heads, head_dim, amp, torch.bfloat16, "cuda")
    vis = causal_visibility(seqlen, seqlen, True, "cuda")
    scale_z = (ALPHA - 1.0) / head_dim ** 0.5
    bm, bn = TB.BLOCK_M, TB.BLOCK_N
    times = {"forward": lambda: adasplash_func(q, k, v, alpha=ALPHA)}

    row_max, tau_floor, gap = TB.max_pass(q, k, vis, scale_z, bm, bn, ALPHA)
    times["max pass"] = lambda: TB.max_pass(q, k, vis, scale_z, bm, bn, ALPHA)
    histogram_tiles = S.histogram_mask(gap)
    hist, zeroed = TB.histogram_pass(q, k, vis, scale_z, bm, bn, row_max, gap.clone(), histogram_tiles, tau_floor)
    times["histogram pass"] = lambda: TB.histogram_pass(q, k, vis, scale_z, bm, bn, row_max, gap.clone(),
                                                        histogram_tiles, tau_floor)
    row_stats = S.RowStats(row_max, hist)
    bracket = TB.coarse_bracket(row_stats, ALPHA)
    times["bracket"] = lambda: TB.coarse_bracket(row_stats, ALPHA)
    tau_low = S.tau_low(row_max, tau_floor)
    active = A.lower_bound_mask(zeroed, bracket.lower, tau_low, bracket.empty, bm)
    refined = S.per_query_tile(~bracket.single, bm, "any")
    refine_tiles = active & refined[..., None]
    low = tau_low - S.MASK_MARGIN
    fine, keep = TB.refine_pass(q, k, vis, scale_z, bm, bn, refine_tiles, bin_index=bracket.bin_index, low=low)
    times["refinement pass"] = lambda: TB.refine_pass(q, k, vis, scale_z, bm, bn, refine_tiles,
                                                      bin_index=bracket.bin_index, low=low)
    tau = TB.fine_tau(bracket, fine, ALPHA)
    times["fine tau"] = lambda: TB.fine_tau(bracket, fine, ALPHA)
    output_tiles = (A.lower_bound_mask(zeroed, tau, tau_low, bracket.empty, bm)
                    & (keep | ~refined[..., None]))
    nonzero = TB.output_pass(q, k, v, vis, scale_z, ALPHA, tau, bm, bn, output_tiles)[-1]
    times["output pass"] = lambda: TB.output_pass(q, k, v, vis, scale_z, ALPHA, tau, bm, bn, output_tiles)

    visible = torch.isfinite(gap)
    share = {name: ((mask & visible).sum() / visible.sum()).item() for name, mask in (
        ("max pass", visible),
        ("histogram pass", histogram_tiles), ("refinement pass", refine_tiles), ("output pass", output_tiles),
        ("nonzero", nonzero))}
    return {name: do_bench(fn, warmup=25, rep=100) for name, fn in times.items()}, share


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=common.csv_list(int), default=[8192, 32768])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--amps", type=common.csv_list(float), default=[1.5, 2.0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal, batch 1, "
          f"{args.heads} heads, D {args.head_dim}, alpha {ALPHA}, {args.family} inputs")
    for seqlen in args.seqlens:
        for amp in args.amps:
            times, share = profile(seqlen, args.head_dim, args.heads, amp, args.family)
            print(f"\nS {seqlen}, amp {amp}: block sparsity {1 - share['nonzero']:.3f}")
            print("| step | ms | visible tiles read |\n|---|---|---|")
            for name, ms in times.items():
                print(f"| {name} | {ms:.3f} | {share[name]:.3f} |" if name in share else f"| {name} | {ms:.3f} | - |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
