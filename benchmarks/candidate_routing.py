"""Our forward (and fwd+bwd) under the candidate kernel's routing settings, the settings in turn
in one process.

    python3 benchmarks/candidate_routing.py 2:512:32 1:512:32 1:256:32 1:256:16 2:512:32
    python3 benchmarks/candidate_routing.py 2:512:32 1:256:32 --captured qkv.pt --modes fwd
    python3 benchmarks/candidate_routing.py 2:384:32:4:8 2:384:32:8:4 2:384:32:16:2 2:384:32:1:1 2:384:32:4:8

Each SETTING is ``margin:floor:sample_from[:parts:part_tiles]``: ``triton_backend.SAMPLE_MARGIN``,
``CROWDED_FLOOR`` and ``SAMPLE_FROM``, which decide which query tiles the candidate kernel keeps
and which it spills to the Newton sweeps (``triton_candidates.candidate_schedule_kernel``), and
``GATHER_PARTS`` and ``GATHER_PART_TILES``, the parts its gather ends after once a row has passed
its limit (the defaults where left out). All reach the kernel as runtime arguments, so the
settings share one compilation; the CUDA graphs of our
forward are dropped between settings (a graph keeps the arguments it was captured with). List
the default setting first and again last: the two bracket the drift of the GPU over the run.

Cases (bf16, causal, alpha 1.5, batch 1, 16 heads unless said): the scattered family at 8K, D 64,
amp 0 (every head at initialisation) and amp 1.0; the structured family at 8K, D 64 and 128, amp
1.0, at 32K, D 64, amp 1.0 and amp 2.0; with ``--captured``, its layers 0 and 1 (``bench_kernels.py``'s
captured rows: batch 2, 4 heads, 8K, D 64). Prints per case, mode and setting the median ms of
``triton.testing.do_bench`` and the ratio to the first setting's. One GPU.
"""
import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels  # noqa: E402
import common  # noqa: E402
import inputs  # noqa: E402
from inputs import make_qkv  # noqa: E402
from ring_adasplash import cuda_graphs  # noqa: E402
from ring_adasplash.kernels import triton_backend  # noqa: E402

CASES = [  # (name, family, batch, seqlen, heads, head_dim, amp)
    ("scattered 8K, D 64, amp 0", "scattered", 1, 8192, 16, 64, 0.0),
    ("scattered 8K, D 64, amp 1.0", "scattered", 1, 8192, 16, 64, 1.0),
    ("structured 8K, D 64, amp 1.0", "structured", 1, 8192, 16, 64, 1.0),
    ("structured 8K, D 128, amp 1.0", "structured", 1, 8192, 16, 128, 1.0),
    ("structured 32K, D 64, amp 1.0", "structured", 1, 32768, 16, 64, 1.0),
    ("structured 32K, D 64, amp 2.0", "structured", 1, 32768, 16, 64, 2.0),
]
CAPTURED_CASES = [(f"captured layer {layer}, 8K", "captured", 2, 8192, 4, 64, float(layer)) for layer in (0, 1)]
SETTING_NAMES = ("SAMPLE_MARGIN", "CROWDED_FLOOR", "SAMPLE_FROM", "GATHER_PARTS", "GATHER_PART_TILES")


def setting(text: str) -> tuple:
    """A SETTING's values, one per name of ``SETTING_NAMES``; the gather's parts, where left out,
    the defaults of ``triton_backend``."""
    parts = text.split(":")
    if len(parts) not in (3, 5) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a setting is margin:floor:sample_from[:parts:part_tiles], three or five "
                                         f"positive integers; got {text!r}")
    values = tuple(int(p) for p in parts)
    return values + tuple(getattr(triton_backend, name) for name in SETTING_NAMES[len(values):])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="+", type=setting, metavar="SETTING",
                   help="margin:floor:sample_from[:parts:part_tiles]")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture: adds its layers 0 and 1")
    p.add_argument("--modes", type=common.csv_list(str), default=["fwd", "fwdbwd"], help="fwd, fwdbwd")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up per measurement (ms)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measured time per measurement (ms)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU: it times the Triton kernels")
    if set(args.modes) - {"fwd", "fwdbwd"}:
        p.error(f"--modes takes fwd and fwdbwd; got {','.join(args.modes)}")
    inputs.CAPTURED_PATH = args.captured
    common.print_header("cuda", {"settings": " ".join(":".join(map(str, s)) for s in args.settings)})
    default = tuple(getattr(triton_backend, name) for name in SETTING_NAMES)
    print(f"default setting: {':'.join(map(str, default))}")
    print("| case | mode | " + " | ".join(":".join(map(str, s)) for s in args.settings) + " |")
    print("|---|---|" + "---|" * len(args.settings))
    try:
        for name, family, batch, seqlen, heads, head_dim, amp in CASES + (CAPTURED_CASES if args.captured else []):
            q, k, v = make_qkv(family, batch, seqlen, heads, head_dim, amp, torch.bfloat16, "cuda")
            for mode in args.modes:
                times = []
                for values in args.settings:
                    for attr, value in zip(SETTING_NAMES, values):
                        setattr(triton_backend, attr, value)
                    cuda_graphs.clear()
                    step = bench_kernels.make_step("ours", mode, q, k, v)
                    times.append(triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms,
                                                         return_mode="median"))
                cells = [f"{times[0]:.4g}"] + [f"{t:.4g} ({t / times[0]:.3f})" for t in times[1:]]
                print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)
            del q, k, v
    finally:
        for attr, value in zip(SETTING_NAMES, default):
            setattr(triton_backend, attr, value)
        cuda_graphs.clear()


if __name__ == "__main__":
    main()
