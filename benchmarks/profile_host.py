"""Where the host's time goes in one fwd+bwd of our attention: the float alpha 1.5, a learnable
per-head tensor of 1.5 as a ``DeviceAlpha`` and as a plain tensor, alphas 1.2 to 2.0 as a
``DeviceAlpha`` (scattered 8K, 16 heads, D 64, bf16):

    python3 benchmarks/profile_host.py

For each, in this order: the synchronizing ops of one call (``torch.cuda.set_sync_debug_mode``,
a prototype that does not see every one), the host ms per call (20 calls issued from an idle
device, no wait: above the device time, the host bounds the call), cProfile's costliest
functions over 20 calls, and ``torch.profiler``'s CPU table (runtime calls and aten ops by self
CPU time) over 10. ``--cases`` picks and orders them (names with spaces: quote the list);
``--no-gc`` turns Python's garbage collector off while they run.
"""
import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402
import common  # noqa: E402
from inputs import make_qkv  # noqa: E402

# name: (bench_kernels' --head-alphas, given as a DeviceAlpha)
CASES = {"float": ("none", False), "DeviceAlpha same": ("same", True), "plain same": ("same", False),
         "DeviceAlpha mixed": ("1.2:2.0", True)}
PROTOTYPE_NOTICE = "prototype feature"  # the sync debug mode's own warning, not a synchronizing op


def synchronizing_ops(step) -> list:
    """The warnings of ``torch.cuda.set_sync_debug_mode`` over one call of ``step``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message) for w in caught if PROTOTYPE_NOTICE not in str(w.message)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = list(CASES)
    p.add_argument("--cases", type=common.csv_list(str), default=names,
                   help=f"which cases, in this order (default: {','.join(names)})")
    p.add_argument("--no-gc", action="store_true", help="Python's cyclic garbage collector off while timing")
    args = p.parse_args()
    unknown = sorted(set(args.cases) - set(names))
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)}; expected some of {', '.join(names)}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_host.py times a GPU: no CUDA device here")
    common.print_header("cuda", {"family": "scattered", "seqlen": 8192, "head_dim": 64, "heads": 16, "amp": 1.0,
                                 "dtype": "bf16", "cases": ",".join(args.cases), "gc": "off" if args.no_gc else "on"})
    if args.no_gc:
        gc.collect()
        gc.disable()
    q, k, v = make_qkv("scattered", 1, 8192, 16, 64, 1.0, dtype=torch.bfloat16, device="cuda")
    for name in args.cases:
        spec, device_alpha = CASES[name]
        common.HEAD_ALPHAS = common.head_alphas(spec, 1.5, 16)
        common.DEVICE_ALPHA = device_alpha
        step = bench_kernels.make_step("ours", "fwdbwd", q, k, v)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        synced = synchronizing_ops(step)
        print(f"\n===== {name}: synchronizing ops in one call: {len(synced)}")
        for message in synced[:5]:
            print("   ", message[:300])
        issued = common.host_ms(step, 20)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(20):
            step()
        profile.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(28)
        print(f"\n===== {name}: host ms per call {issued:.3f} =====")
        print("\n".join(text.getvalue().splitlines()[:50]))
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
