"""What a learnable alpha per head costs, and how much of it is the host's read of its values.

    python benchmarks/profile_alpha_read.py --family scattered --seqlen 8192 --head-dim 64

A tensor alpha's values decide the kernels (one value on every head runs the float alpha's;
``entmax_spec.call_spec``) and are checked to lie in (1, 2] (``checks.check_head_alpha``), so
every call copies them to the host, which waits for the device to finish the work queued
before: the next call's kernels are then launched onto an idle device. For each mode (fwd,
fwd+bwd) and each alpha (a float; a learnable per-head tensor of 1.5 on every head, ``same``;
alphas 1.2 to 2 over the heads, ``mixed``) this prints the median ms of
``triton.testing.do_bench``, the device ms per call (the kernels' time from ``torch.profiler``)
and the host ms per call (``common.host_ms``: above the device ms, the host's work or a wait
bounds the call), and, for the tensors, all three again with the host read made once per tensor and reused
(``no read``), and with the tensor given as a ``DeviceAlpha`` (never read; every head in the
general form's schedule, each in its own form in the kernels' loops).
The ``no read`` variant only measures; it is not a way to call the library (a value moved after
the first call would be missed).
"""
import argparse

import torch
import triton.testing

import bench_kernels
import common
import ring_adasplash.functional as functional
from inputs import FAMILIES, make_qkv

ALPHAS = {"float": "none", "same": "same", "mixed": "1.2:2.0"}


def read_once(check):
    """``check`` (``check_head_alpha``) that reads a tensor's values the first time it sees it
    and reuses them after: the measurement's stand-in for values kept on the device."""
    seen = {}

    def checked(alpha, heads):
        if not isinstance(alpha, torch.Tensor):
            return check(alpha, heads)
        if id(alpha) not in seen:
            seen[id(alpha)] = (alpha, check(alpha, heads))  # the tensor held: its id stays its own
        return seen[id(alpha)][1]

    return checked


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_case_arguments(p)
    p.add_argument("--family", choices=sorted(FAMILIES), default="scattered", help="input family (inputs.py)")
    p.set_defaults(seqlen=8192, amp=1.0)
    p.add_argument("--calls", type=int, default=10, help="calls profiled for the device time")
    p.add_argument("--kernels", type=int, default=6, help="costliest kernels listed per alpha and read")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_alpha_read.py times a GPU: no CUDA device here")
    common.print_header("cuda", {"family": args.family, "seqlen": args.seqlen, "head_dim": args.head_dim,
                                 "heads": args.heads, "amp": args.amp, "dtype": "bf16"})
    q, k, v = make_qkv(args.family, 1, args.seqlen, args.heads, args.head_dim, args.amp, dtype=torch.bfloat16,
                       device="cuda")
    check = functional.check_head_alpha
    print("| mode | alpha | host read | do_bench ms | device ms per call | host ms per call |\n"
          "|---|---|---|---|---|---|")
    listings = []
    try:
        for mode in ("fwd", "fwdbwd"):
            for name, spec in ALPHAS.items():
                for read in (("every call",) if name == "float" else ("every call", "no read", "DeviceAlpha")):
                    common.HEAD_ALPHAS = common.head_alphas(spec, 1.5, args.heads)
                    common.DEVICE_ALPHA = read == "DeviceAlpha"
                    functional.check_head_alpha = read_once(check) if read == "no read" else check
                    step = bench_kernels.make_step("ours", mode, q, k, v)
                    ms = triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median")
                    total, by_kernel = common.device_ms_by_kernel(step, args.calls)
                    host = common.host_ms(step, args.calls)
                    print(f"| {mode} | {name} | {read} | {ms:.3f} | {total:.3f} | {host:.3f} |", flush=True)
                    if read != "no read":
                        listings.append((mode, name, read, by_kernel.most_common(args.kernels)))
    finally:
        functional.check_head_alpha = check
        common.HEAD_ALPHAS, common.DEVICE_ALPHA = None, False
    for mode, name, read, kernels in listings:
        print(f"\n{mode}, {name}, {read}: device ms per call by kernel")
        for kernel, ms in kernels:
            print(f"    {ms:7.3f}  {kernel[:100]}")


if __name__ == "__main__":
    main()
