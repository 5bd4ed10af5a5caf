"""Device ms of the backward's kernels under launch settings, one setting of one kernel at a time.

    python3 benchmarks/backward_settings.py --kernel dkdv 4:2:64 4:2:32 4:3:32 8:2:32
    python3 benchmarks/backward_settings.py --kernel dq 4:2:64 4:2:32

Each SETTING is ``warps:stages:step``: the kernel's ``num_warps``, ``num_stages`` and rows a step
(dK/dV: query rows, ``Q_STEP``; dQ: keys, ``K_STEP``; 64 is a whole tile), the other kernel at its
setting (``triton_backend._CONFIGS``). Cases: scattered 8K at D 64 and 128 (16 heads, causal) and
a 4K window at 128K tokens (D 128, structured amp 1.0), bf16, each called as ``bench_masks.py``
calls ours. Per case, the device ms of a fwd+bwd call (``common.make_step``) in all and of the
dK/dV and dQ kernels, from ``torch.profiler`` over five calls (``common.device_ms_by_kernel``).
One GPU.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_masks  # noqa: E402
import common  # noqa: E402
from inputs import scattered_qkv, structured_qkv  # noqa: E402
from ring_adasplash.kernels import triton_backend  # noqa: E402

STEP_NAME = {"dkdv": "Q_STEP", "dq": "K_STEP"}


def cases():
    found = []
    for d in (64, 128):
        attn, tensors = bench_masks.prepare_ours_causal(
            *scattered_qkv(1, 8192, 16, d, 1.0, dtype=torch.bfloat16, device="cuda"))
        found.append((f"scattered 8K, D {d}", common.make_step(attn, "fwdbwd", tensors)))
    attn, tensors = bench_masks.prepare_ours_window(
        4096, *structured_qkv(1, 131072, 16, 128, 1.0, dtype=torch.bfloat16, device="cuda"))
    found.append(("window 4K at 128K, D 128", common.make_step(attn, "fwdbwd", tensors)))
    return found


def setting(text: str) -> tuple:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[2]) not in (16, 32, 64):
        raise argparse.ArgumentTypeError(f"a setting is warps:stages:step with step 16, 32 or 64; got {text!r}")
    return tuple(int(p) for p in parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=sorted(STEP_NAME), required=True, help="the kernel whose setting varies")
    p.add_argument("settings", nargs="+", type=setting, metavar="SETTING", help="warps:stages:step")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it times the Triton kernels")
    common.print_header(torch.device("cuda"))
    base = triton_backend._CONFIGS[args.kernel]
    found = cases()
    for warps, stages, step in args.settings:
        triton_backend._CONFIGS[args.kernel] = (lambda d, w=warps, s=stages, n=step: base(d) | {
            "num_warps": w, "num_stages": s, STEP_NAME[args.kernel]: n})
        for name, call in found:
            start = time.time()
            total, by_kernel = common.device_ms_by_kernel(call, calls=5)
            timed = " ".join(f"{n} {t:.3f}" for n, t in sorted(by_kernel.items())
                             if n.startswith(("dkdv_kernel", "dq_kernel")))
            print(f"{args.kernel} {warps}:{stages}:{step} {name}: total {total:.3f} ms; {timed} "
                  f"({time.time() - start:.0f}s)", flush=True)
        triton_backend._CONFIGS[args.kernel] = base


if __name__ == "__main__":
    main()
