"""Time each pass of the forward on one GPU, and the share of visible tiles each pass reads.

    python benchmarks/profile_passes.py --seqlens 8192,32768 --head-dim 64 --amps 1.5,2.0
    python benchmarks/profile_passes.py --family sinkwindow --seqlens 8192 --head-dim 64 --amps 0.5,1.0
    python benchmarks/profile_passes.py --family scattered --schedules newton,histogram --amps 1.0
    python benchmarks/profile_passes.py --family captured --captured qkv.pt --batch 2 --heads 4 --kernels 10

Runs the real single-device forward (``kernels/algorithm.entmax_forward``, one key block) through
the Triton backend wrapped so that every backend call is timed with CUDA events (median ms over
the repeats of each pass's total per forward; the call's small PyTorch ops and launches
included), and the whole forward. Tile shares are of the visible (query tile, key tile) pairs,
read off the ``BlockMask`` each pass receives (its last call). ``--schedules``: the ways of
finding tau (``algorithm.SCHEDULES``) to compare, each on the same inputs. ``--kernels N``: also
the device time of each kernel per forward, from ``torch.profiler`` over N untimed forwards
(``common.device_ms_by_kernel``), where the pass timings above hold small ops and launches.
"""
import argparse
import collections
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import inputs  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402
from ring_adasplash.kernels import EntmaxSpec, triton_backend  # noqa: E402
from ring_adasplash.kernels.algorithm import SCHEDULES, SingleBlock, entmax_forward  # noqa: E402
from ring_adasplash.kernels.block_mask import BlockMask  # noqa: E402
from ring_adasplash.kernels.visibility import causal_visibility  # noqa: E402

TIMED = ("max_pass", "histogram_pass", "coarse_bracket", "fine_histogram_pass", "newton_sums_pass",
         "newton_moments_pass", "newton_step", "newton_schedule", "fine_tau", "output_pass")


class TimedBackend:
    """A backend whose passes record CUDA events around each call, and the tiles each one reads."""

    def __init__(self, backend):
        self.backend = backend
        self.events = collections.defaultdict(list)
        self.share = {}

    def __getattr__(self, name):
        attr = getattr(self.backend, name)
        if name not in TIMED:
            return attr

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = attr(*args, **kwargs)
            end.record()
            self.events[name].append((start, end))
            masks = [a for a in (*args, *kwargs.values()) if isinstance(a, BlockMask)]
            if masks:
                self.share[name] = masks[0].nonzero_tiles() / max(masks[0].visible_tiles(), 1)
            return result

        return timed

    def medians(self, repeats: int) -> dict:
        """Per pass, the median over the forwards of its total time in one forward (ms)."""
        torch.cuda.synchronize()
        medians = {}
        for name, pairs in self.events.items():
            per_forward = len(pairs) // repeats
            totals = [sum(s.elapsed_time(e) for s, e in pairs[i * per_forward:(i + 1) * per_forward])
                      for i in range(repeats)]
            medians[name] = statistics.median(totals)
        return medians


def profile(seqlen, head_dim, heads, amp, family="structured", repeats=20, alpha=1.5, schedule=None, batch=1,
            kernel_calls=0):
    """``(medians, share, block sparsity, by_kernel)``: ``by_kernel`` a ``collections.Counter`` of
    device ms per forward by kernel name over ``kernel_calls`` forwards (None if 0)."""
    q, k, v = make_qkv(family, batch, seqlen, heads, head_dim, amp, torch.bfloat16, "cuda")
    vis = causal_visibility(seqlen, seqlen, True, "cuda")
    blocks, spec, scale = SingleBlock(k, v, vis), EntmaxSpec(alpha), head_dim ** -0.5
    entmax_forward(triton_backend, q, blocks, spec, scale, schedule=schedule)  # compile
    timed = TimedBackend(triton_backend)
    whole = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd = entmax_forward(timed, q, blocks, spec, scale, schedule=schedule)
        end.record()
        whole.append((start, end))
    medians = timed.medians(repeats)
    medians["forward"] = statistics.median(s.elapsed_time(e) for s, e in whole)
    by_kernel = None
    if kernel_calls:
        _, by_kernel = common.device_ms_by_kernel(
            lambda: entmax_forward(triton_backend, q, blocks, spec, scale, schedule=schedule), kernel_calls)
    return medians, timed.share, fwd.block_masks[0].sparsity(), by_kernel


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=common.csv_list(int), default=[8192, 32768], help="sequence lengths")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward")
    p.add_argument("--amps", type=common.csv_list(float), default=[1.5, 2.0], help="input amplitudes (sparsity)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured", help="input family (inputs.py)")
    p.add_argument("--repeats", type=int, default=20, help="forwards timed per row")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured "
                                                     "(amp is then the layer)")
    p.add_argument("--alpha", type=float, default=1.5, help="entmax alpha")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also device ms per forward by kernel (torch.profiler over N forwards); 0: not")
    p.add_argument("--schedules", type=common.csv_list(str), default=["default"],
                   help=f"ways of finding tau, comma-separated: default, {', '.join(SCHEDULES)}")
    p.add_argument("--launch", type=common.csv_list(str), default=[], metavar="KIND=WARPS:STAGES",
                   help="try other launch settings than the fixed table (triton_backend._CONFIGS) for a "
                        f"kind of pass ({', '.join(triton_backend._CONFIGS)}), e.g. sparse=8:3,max=8:2")
    args = p.parse_args()
    if args.batch < 1 or args.kernels < 0:
        p.error(f"--batch must be at least 1 and --kernels at least 0; got {args.batch} and {args.kernels}")
    for setting in args.launch:
        kind, _, value = setting.partition("=")
        warps, stages = (int(x) for x in value.split(":"))
        if kind not in triton_backend._CONFIGS:
            p.error(f"--launch: kind must be one of {', '.join(triton_backend._CONFIGS)}; got {kind!r}")
        triton_backend._CONFIGS[kind] = (lambda d, base=triton_backend._CONFIGS[kind], w=warps, n=stages:
                                         base(d) | {"num_warps": w, "num_stages": n})
    inputs.CAPTURED_PATH = args.captured
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, causal, batch {args.batch}, "
          f"{args.heads} heads, D {args.head_dim}, alpha {args.alpha}, {args.family} inputs"
          + (f", launch {','.join(args.launch)}" if args.launch else ""))
    for seqlen in args.seqlens:
        for amp in args.amps:
            for schedule in args.schedules:
                times, share, sparsity, by_kernel = profile(seqlen, args.head_dim, args.heads, amp, args.family,
                                                            args.repeats, args.alpha,
                                                            None if schedule == "default" else schedule,
                                                            args.batch, args.kernels)
                print(f"\nS {seqlen}, amp {amp}, schedule {schedule}: block sparsity {sparsity:.3f}")
                print("| step | median ms per forward | visible tiles read |\n|---|---|---|")
                for name, ms in times.items():
                    print(f"| {name} | {ms:.3f} | " + (f"{share[name]:.3f} |" if name in share else "- |"))
                if by_kernel is not None:
                    print(f"\n| kernel | device ms per forward ({args.kernels} forwards) |\n|---|---|")
                    for name, ms in by_kernel.most_common():
                        if ms >= 0.005:  # the small PyTorch ops, a few microseconds each, left out
                            print(f"| {name[:80]} | {ms:.3f} |")
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
