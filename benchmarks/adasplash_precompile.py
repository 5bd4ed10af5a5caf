"""Compile AdaSplash's autotuning configurations ahead, side by side in several processes, so that
a benchmark's first AdaSplash call searches them with every kernel already compiled.

    python benchmarks/adasplash_precompile.py --family scattered --rows 8192:128:1.0 --workers 16

AdaSplash 0.2.2 autotunes its kernels at the first call of each sequence length and head dim:
every configuration of every autotuned kernel is compiled, one after another, then timed. On one
H200 at 8K tokens, D 128, that first call outlasted nine minutes, nearly all of it compiling. Here
each of ``--workers`` processes keeps every N-th configuration of each autotuned kernel (its share;
the others are removed from its copy of the lists), runs AdaSplash forward and backward once on
the row's inputs, and so compiles its share into Triton's on-disk cache, which the processes of one
machine share. The benchmark's process then runs AdaSplash's own search over all configurations,
unchanged, and finds each one compiled: only the timing is left. ``bench_kernels.py
--adasplash-precompile N`` runs this before AdaSplash's first call of each row.
"""
import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import inputs  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402


def autotuners() -> list:
    """AdaSplash's autotuned kernels (``triton.runtime.autotuner.Autotuner``), each once, from
    every module of the package (it imports them at their first call; here, all of them now)."""
    import adasplash
    from triton.runtime.autotuner import Autotuner

    found = {}
    for module in sorted(pkgutil.iter_modules(adasplash.__path__), key=lambda m: m.name):
        for obj in vars(importlib.import_module(f"adasplash.{module.name}")).values():
            if isinstance(obj, Autotuner):
                found.setdefault(id(obj), obj)
    return list(found.values())


def share(configs: list, part: int, parts: int, offset: int = 0) -> list:
    """Worker ``part``'s share of ``configs`` out of ``parts``: the configurations at the places j
    with ``(j + offset) % parts == part`` (the shares partition the list). ``offset``: the
    configurations of the kernels before this one, so that the one-too-many of every kernel do not
    all fall on the first workers."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}); got {part}")
    return [config for j, config in enumerate(configs) if (j + offset) % parts == part]


def shares(tuners: list, part: int, parts: int) -> list[list]:
    """Worker ``part``'s share of each of ``tuners``' configurations, the offsets running on."""
    offset, result = 0, []
    for tuner in tuners:
        result.append(share(tuner.configs, part, parts, offset))
        offset += len(tuner.configs)
    return result


def compile_share(family: str, seqlen: int, head_dim: int, amp: float, part: int, parts: int, args) -> str:
    """Worker: AdaSplash forward and backward once on the row's inputs with each autotuned kernel
    cut to this worker's share of its configurations (a kernel with no share here keeps one of
    its configurations, which some other worker compiles too: the call needs every kernel).
    Returns a line saying what it compiled. The calls are ``bench_kernels.py``'s own steps, fwd
    and fwdbwd, so they take AdaSplash's paths as the benchmark does."""
    import bench_kernels

    kept = 0
    tuners = autotuners()
    for tuner, mine in zip(tuners, shares(tuners, part, parts)):
        tuner.configs = mine or tuner.configs[part % len(tuner.configs):][:1]
        kept += len(mine)
    bench_kernels.ALPHA = args.alpha  # read by its AdaSplash call, as its main sets it
    qkv = make_qkv(family, args.batch, seqlen, args.heads, head_dim, amp, common.torch_dtype(args.dtype), "cuda",
                   kv_heads=args.kv_heads, seed=args.seed)
    start = time.time()
    for mode in ("fwd", "fwdbwd"):
        bench_kernels.make_step("adasplash", mode, *qkv)()
    torch.cuda.synchronize()
    return f"part {part}/{parts}: {kept} configurations, {time.time() - start:.1f} s"


def precompile(family: str, seqlen: int, head_dim: int, amp: float, workers: int, args) -> float:
    """Runs ``workers`` worker processes on one row, side by side; returns the seconds they took.
    A worker that fails (a configuration out of the GPU's shared memory, say) prints why; its
    configurations then compile in the benchmark's own search, as without this step."""
    start = time.time()
    base = [sys.executable, os.path.abspath(__file__), "--family", family, "--rows", f"{seqlen}:{head_dim}:{amp}",
            "--heads", str(args.heads), "--batch", str(args.batch), "--dtype", args.dtype, "--alpha", str(args.alpha),
            "--seed", str(args.seed), "--parts", str(workers)]
    if args.kv_heads:
        base += ["--kv-heads", str(args.kv_heads)]
    if args.captured:
        base += ["--captured", args.captured]
    running = [subprocess.Popen(base + ["--part", str(part)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for part in range(workers)]
    for worker in running:
        output, _ = worker.communicate()
        lines = output.strip().splitlines()
        print(f"adasplash_precompile: {lines[-1] if lines else 'no output'}"
              + ("" if worker.returncode == 0 else f" (exit {worker.returncode})"), file=sys.stderr)
    return time.time() - start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=common.csv_list(str), default=[], help="SEQLEN:HEAD_DIM:AMP,... as bench_kernels.py")
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured", help="input family of inputs.py")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: --heads)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--dtype", choices=sorted(common.DTYPE_NAMES), default="bf16", help="input dtype")
    p.add_argument("--alpha", type=float, default=common.ALPHA, help="entmax alpha")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes side by side")
    p.add_argument("--plan", action="store_true",
                   help="print each autotuned kernel's configurations and each worker's share of them, compile "
                        "nothing (no GPU needed)")
    p.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)  # a worker's share
    p.add_argument("--parts", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1; got {args.workers}")
    return args


def print_plan(workers: int) -> None:
    """Per autotuned kernel (module.name): its configurations, and how many each worker takes."""
    tuners = autotuners()
    plan = [shares(tuners, part, workers) for part in range(workers)]
    for i, tuner in enumerate(tuners):
        counts = [len(plan[part][i]) for part in range(workers)]
        print(f"{tuner.base_fn.__module__}.{tuner.base_fn.__name__}: {len(tuner.configs)} configurations; "
              f"per worker {' '.join(map(str, counts))}")


def main(argv=None):
    args = parse_args(argv)
    inputs.CAPTURED_PATH = args.captured
    if args.plan:
        print_plan(args.workers)
        return
    for text in args.rows:
        seqlen, head_dim, amp = text.split(":")
        row = (int(seqlen), int(head_dim), float(amp))
        if args.part is not None:
            print(compile_share(args.family, *row, args.part, args.parts, args))
        else:
            seconds = precompile(args.family, *row, args.workers, args)
            print(f"{text}: {args.workers} workers, {seconds:.1f} s")


if __name__ == "__main__":
    main()
