"""Where one forward (and backward) of adasplash_func spends its time, by kernel and by op.

    python benchmarks/profile_forward.py --seqlen 32768 --head-dim 64 --amp 1.5
    python benchmarks/profile_forward.py --seqlen 8192 --head-dim 128 --amp 1.0 --alpha 2.0 --summary
    python benchmarks/profile_forward.py --seqlen 8192 --family scattered --amp 1.0 --backward --head-alphas same
    python benchmarks/profile_forward.py --seqlen 8192 --family scattered --amp 1.0 --backward --impl adasplash
    python benchmarks/profile_forward.py --family captured --captured qkv.pt --heads 4 --batch 2 --seqlen 8192 --amp 0

``--impl adasplash``: AdaSplash 0.2.2's kernels on the same inputs (``bench_kernels.py``'s call), for
a side-by-side by kernel; its autotuning configurations are compiled ahead first
(``adasplash_precompile.py``, ``--adasplash-precompile`` processes), so that the warm-up calls
only time them.

``--summary``: the wall time per call (mean of ``--calls`` calls after warm-up) and each kernel's
device time per call (``torch.profiler`` over ``--calls`` more calls), instead of PyTorch's tables
of one call. Runs on the working tree or on any ``PYTHONPATH`` that provides ``ring_adasplash``.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import adasplash_precompile
import bench_kernels
import common
import inputs
from inputs import FAMILIES, make_qkv


def summary(step, calls: int, rows: int) -> None:
    """Wall ms per call, then the device ms per call of the ``rows`` costliest kernels."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / calls * 1000
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            kernels[event.key] = (device_us / calls / 1000, event.count / calls)
    print(f"wall {wall:.3f} ms per call, kernels {sum(ms for ms, _ in kernels.values()):.3f} ms per call")
    for name, (ms, launches) in sorted(kernels.items(), key=lambda item: -item[1][0])[:rows]:
        print(f"  {ms:8.3f} ms  x{launches:5.1f}  {name[:90]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_case_arguments(p)
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured", help="input family (inputs.py)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured "
                                                     "(amp is then the layer)")
    p.add_argument("--alpha", type=float, default=1.5, help="entmax alpha")
    p.add_argument("--head-alphas", default="none", metavar="none|same|LO:HI",
                   help="alpha as a learnable per-head tensor (common.head_alphas) instead of a float")
    p.add_argument("--backward", action="store_true", help="profile forward and backward")
    p.add_argument("--summary", action="store_true", help="wall time and device time per kernel per call")
    p.add_argument("--calls", type=int, default=20, help="calls timed and profiled with --summary")
    p.add_argument("--rows", type=int, default=25, help="rows of the kernel table to print")
    p.add_argument("--impl", choices=("ours", "adasplash"), default="ours",
                   help="ours, or AdaSplash 0.2.2 (its AdaSplash-2 path at alpha 1.5) on the same inputs")
    p.add_argument("--adasplash-precompile", type=int, default=16, metavar="N",
                   help="with --impl adasplash: processes that compile its autotuning configurations first")
    args = p.parse_args()
    if args.impl == "adasplash" and args.head_alphas != "none":
        p.error("--head-alphas is ours alone (AdaSplash takes one float alpha); leave it at none with --impl adasplash")
    inputs.CAPTURED_PATH = args.captured
    common.ALPHA = bench_kernels.ALPHA = args.alpha
    common.HEAD_ALPHAS = common.head_alphas(args.head_alphas, args.alpha, args.heads)
    if args.impl == "adasplash" and args.adasplash_precompile:
        captured = ["--captured", args.captured] if args.captured else []
        settings = bench_kernels.parse_args(["--heads", str(args.heads), "--alpha", str(args.alpha), "--batch",
                                             str(args.batch)] + captured)
        adasplash_precompile.precompile(args.family, args.seqlen, args.head_dim, args.amp, args.adasplash_precompile,
                                        settings)
    q, k, v = make_qkv(args.family, args.batch, args.seqlen, args.heads, args.head_dim, args.amp, torch.bfloat16,
                       "cuda")
    # bench_kernels.py's step: "fwd" under no_grad, "fwdbwd" the gradients of q, k, v
    step = bench_kernels.make_step(args.impl, "fwdbwd" if args.backward else "fwd", q, k, v)

    for _ in range(5):
        step()
    if args.summary:
        summary(step, args.calls, args.rows)
        return
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
