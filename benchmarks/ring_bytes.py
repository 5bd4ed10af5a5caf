"""Bytes each ring pass sends against a dense ring, per rank (any backend; bytes do not depend on it).

    torchrun --nproc_per_node 4 benchmarks/ring_bytes.py --seqlen 4096 --amp 2.0
    torchrun --nproc_per_node 4 benchmarks/ring_bytes.py --seqlen 4096 --amp 0.5 --window 512 --sinks 4

Runs one forward and backward of ring and zigzag entmax attention on the structured inputs of
the kernel benchmark and prints, per pass, the bytes sent over the bytes a dense ring sends for
the same exchange (over all its sweeps), with the block sparsity the block mask measured, how
the work (visible tiles) spreads over the ranks, and the bytes of every pass that finds tau in
units of one dense K sweep (``RING_ADASPLASH_SCHEDULE`` picks the schedule, as everywhere).
"""
import argparse

import torch
import torch.distributed as dist

from common import init_ranks, print_header
from inputs import make_qkv
from ring_adasplash import telemetry
from ring_adasplash.parallel import layouts, ring_adasplash_func, zigzag_ring_adasplash_func
from ring_adasplash.comm import shutdown

PASSES = ("max", "histogram", "fine-histogram", "newton", "output", "backward", "backward-grads")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=4096, help="global sequence length (tokens)")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--amp", type=float, default=2.0, help="amplitude of the positional code (higher: sparser)")
    p.add_argument("--family", default="structured", choices=("structured", "sinkwindow"),
                   help="input family of inputs.py: structured (local, amp sets the sparsity) or sinkwindow")
    p.add_argument("--window", type=int, default=-1,
                   help="sliding window: each query sees this many keys before it (-1: none)")
    p.add_argument("--sinks", type=int, default=0, help="attention sinks: the first keys every query sees")
    args = p.parse_args()
    rank, world, device = init_ranks()
    cuda = device.type == "cuda"
    if rank == 0:
        print_header(str(device), vars(args) | {"world_size": world})
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = make_qkv(args.family, 1, args.seqlen, args.heads, args.head_dim, args.amp, dtype, device)
    rows = []
    for name, layout, fn in (("ring", "contiguous", ring_adasplash_func), ("zigzag", "zigzag", zigzag_ring_adasplash_func)):
        local = [layouts.shard(t, layout, rank, world).detach().requires_grad_() for t in (q, k, v)]
        with telemetry.record() as t:
            out = fn(*local, alpha=1.5, causal=True, window_size=(args.window, -1), sink_tokens=args.sinks)
            out.backward(torch.ones_like(out))
        counts = torch.tensor([[*t.bytes_by_pass.get(p, (0, 0))] for p in PASSES] +
                              [[t.nonzero_tiles, t.visible_tiles]], dtype=torch.float64, device=device)
        # the work of each rank: the tiles its queries see (what the max pass computes)
        work = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(work, counts[-1, 1:].clone())
        dist.all_reduce(counts)
        work = torch.cat(work).cpu()
        rows.append((name, counts.cpu(), float(work.max() / work.mean())))
    if rank == 0:
        print("\n| strategy | block sparsity | visible tiles, busiest rank / mean | "
              + " | ".join(f"{p} sent / dense" for p in PASSES) + " | passes finding tau, sent / one dense K sweep |")
        print("|---|---|---|" + "---|" * (len(PASSES) + 1))
        finding_tau = [PASSES.index(p) for p in ("histogram", "fine-histogram", "newton")]
        for name, c, imbalance in rows:
            sparsity = 1 - c[-1, 0] / c[-1, 1]
            cells = [f"{c[i, 0] / c[i, 1]:.3f}" if c[i, 1] else "-" for i in range(len(PASSES))]
            # every sweep of the passes that find tau (the Newton schedule makes several), in units
            # of what the dense max pass would send: the tau-finding traffic of either schedule
            sweeps = sum(c[i, 0] for i in finding_tau) / c[PASSES.index("max"), 1]
            print(f"| {name} | {sparsity:.3f} | {imbalance:.2f} | " + " | ".join(cells) + f" | {sweeps:.2f} |")
    shutdown()  # destroys the process group; see ring_adasplash.comm.shutdown


if __name__ == "__main__":
    main()
