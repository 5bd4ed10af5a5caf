"""Where the candidate kernel's time goes: the Newton schedule of one forward, taken apart.

    python benchmarks/profile_candidates.py --family scattered --seqlen 32768 --head-dim 128 --amp 1.0
    python benchmarks/profile_candidates.py --family structured --seqlen 131072 --window 4096
    TRITON_INTERPRET=1 RING_ADASPLASH_BACKEND=triton python benchmarks/profile_candidates.py --device cpu --seqlen 256 --heads 2

Runs one real single-device forward (``kernels/algorithm.entmax_forward``, Triton backend),
keeps the arguments its max pass and its Newton schedule (``triton_backend.newton_schedule``)
were called with, and times each again (median ms of ``--repeats`` calls, CUDA events) as it ran
and in variants that leave parts out, on the same tiles:

- ``max pass``: one Q.K^T sweep of the visible tiles with a row max: the floor of a sweep;
- ``schedule``: the Newton schedule as the forward ran it (candidate kernel, with the output from
  the candidates, then the sweeps on the spilled query tiles);
- ``schedule, no output``: the same without the output from the candidates;
- ``gather sweep alone``: every row marked done (row max +inf): the candidate kernel sweeps its
  tiles, but no key is a candidate, no step runs and no output is summed;
- ``sweeps only``: no candidate slots (``RING_ADASPLASH_CANDIDATES=0``): one sweep per Newton step.

The spilled query tiles (a row with more candidates than the slots) are reported too. On the CPU
(interpreted kernels) the script only checks that it runs: its times say nothing.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import inputs  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402
from ring_adasplash.kernels import EntmaxSpec, triton_backend  # noqa: E402
from ring_adasplash.kernels.algorithm import SingleBlock, entmax_forward  # noqa: E402
from ring_adasplash.kernels.backend import CANDIDATES_ENV  # noqa: E402
from ring_adasplash.kernels.visibility import NO_WINDOW, causal_visibility  # noqa: E402


class CapturingBackend:
    """The Triton backend, keeping the arguments of the first call of each pass named in ``KEPT``."""

    KEPT = ("max_pass", "newton_schedule")

    def __init__(self):
        self.calls = {}

    def __getattr__(self, name):
        attr = getattr(triton_backend, name)
        if name not in self.KEPT:
            return attr

        def kept(*args, **kwargs):
            self.calls.setdefault(name, (args, kwargs))
            return attr(*args, **kwargs)

        return kept


def median_ms(fn, repeats: int, device: str) -> float:
    """Median time of ``fn()`` over ``repeats`` calls after one untimed call: CUDA events on the
    GPU, the wall clock on the CPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def schedule_with(args, kwargs, row_max=None, output=True, slots=None):
    """A call of ``triton_backend.newton_schedule`` with the forward's arguments, ``row_max``
    replaced where given, the output request dropped without ``output``, and
    ``RING_ADASPLASH_CANDIDATES`` at ``slots`` where given."""
    args = list(args)
    if row_max is not None:
        args[3] = row_max  # (problem, tiles, reference, row_max, tolerance, step_tolerance)
    kwargs = dict(kwargs) if output else {key: value for key, value in kwargs.items() if key != "output"}

    def call():
        return triton_backend.newton_schedule(*args, **kwargs)

    return call if slots is None else common.with_env(call, CANDIDATES_ENV, str(slots))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=32768, help="sequence length")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--amp", type=float, default=1.0, help="input amplitude (sparsity)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="scattered", help="input family (inputs.py)")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured "
                   "(--amp picks the layer)")
    p.add_argument("--alpha", type=float, default=1.5, help="entmax alpha")
    p.add_argument("--window", type=int, default=0,
                   help="causal sliding window: each query sees its WINDOW last keys (0: plain causal)")
    p.add_argument("--repeats", type=int, default=10, help="calls timed per variant")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda, or cpu for a smoke test")
    args = p.parse_args()
    inputs.CAPTURED_PATH = args.captured
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    q, k, v = make_qkv(args.family, args.batch, args.seqlen, args.heads, args.head_dim, args.amp, dtype, args.device)
    if args.window < 0:
        p.error(f"--window must be >= 0 (0: plain causal), got {args.window}")
    window_size = (args.window - 1, 0) if args.window else NO_WINDOW
    vis = causal_visibility(args.seqlen, args.seqlen, True, args.device, window_size=window_size)
    backend = CapturingBackend()
    entmax_forward(backend, q, SingleBlock(k, v, vis), EntmaxSpec(args.alpha), args.head_dim ** -0.5,
                   schedule="newton")
    if "newton_schedule" not in backend.calls:
        p.error("this forward ran no Newton schedule (alpha above 1.5 takes the histogram schedule)")
    max_args, max_kwargs = backend.calls["max_pass"]
    sched_args, sched_kwargs = backend.calls["newton_schedule"]
    row_max = sched_args[3]
    _, _, partial = schedule_with(sched_args, sched_kwargs)()
    spilled = float(partial.open.float().mean()) if partial is not None else float("nan")

    variants = {
        "max pass": lambda: triton_backend.max_pass(*max_args, **max_kwargs),
        "schedule": schedule_with(sched_args, sched_kwargs),
        "schedule, no output": schedule_with(sched_args, sched_kwargs, output=False),
        "gather sweep alone": schedule_with(sched_args, sched_kwargs, row_max=torch.full_like(row_max, float("inf")),
                                            output=False),
        "sweeps only": schedule_with(sched_args, sched_kwargs, output=False, slots=0),
    }
    common.print_header(args.device, {"family": args.family, "seqlen": args.seqlen, "batch": args.batch,
                                      "heads": args.heads, "head_dim": args.head_dim, "amp": args.amp,
                                      "alpha": args.alpha, "window": args.window,
                                      "dtype": str(dtype).replace("torch.", "")})
    print(f"\nquery tiles spilled to the sweeps: {spilled:.3f}")
    print("| variant | median ms |\n|---|---|")
    for name, fn in variants.items():
        print(f"| {name} | {median_ms(fn, args.repeats, args.device):.3f} |")


if __name__ == "__main__":
    main()
