"""Every sequence-parallel strategy against the one-GPU result on the same inputs (launch with torchrun).

    torchrun --nproc_per_node 8 benchmarks/check_strategies.py --seqlen 65536
    torchrun --nproc_per_node 4 benchmarks/check_strategies.py --device cpu --seqlen 1024 --heads 4 --head-dim 32 --dtype fp32

Each rank builds the same global q, k, v and output gradient (same seed), runs
``adasplash_func`` on the whole sequence (the one-GPU result) and every strategy on its own
shard, and compares output and gradients over the whole sequence: relative error
||ours - one GPU|| / ||one GPU||, summed over ranks. Strategies, from
``ring_adasplash.config.STRATEGIES``: ring, zigzag, allgather, ulysses, deepspeed (when the
package is installed) and the 2D mesh ``uspUxR`` for every U x R = P with U, R > 1. Rank 0
prints a table; the exit status is 1 if any error exceeds ``--tol``.
"""
import argparse
import functools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_distributed import usp_groups, global_inputs, init_distributed  # noqa: E402
from ring_adasplash.comm import shutdown  # noqa: E402
from ring_adasplash.config import STRATEGIES, one_group_strategies  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=65536, help="global sequence length (tokens)")
    common.add_input_arguments(p)
    p.add_argument("--alpha", type=float, default=1.5, help="entmax alpha in (1, 2]")
    p.add_argument("--tol", type=float, default=2e-2, help="largest relative error accepted")
    return p.parse_args(argv)


def strategies(world):
    """name -> (attention on local shards, shard(x) -> this rank's part of a global (B, S, ...) tensor)."""
    from ring_adasplash import parallel as P

    rank = dist.get_rank()
    table = {s.name: (s.load(), functools.partial(P.layouts.shard, layout=s.layout, rank=rank, world_size=world,
                                                  dim=1))
             for s in one_group_strategies()}  # deepspeed only where it is installed
    usp = STRATEGIES["usp"]
    for ulysses in (u for u in range(2, world) if world % u == 0):
        ulysses_group, ring_group = usp_groups(ulysses, world // ulysses)
        mesh = P.UspMesh.from_groups(ulysses_group, ring_group)
        table[f"usp{ulysses}x{world // ulysses}"] = (
            functools.partial(usp.load(), ulysses_group=ulysses_group, ring_group=ring_group,
                              ring_layout=usp.layout),
            functools.partial(P.usp_shard, mesh=mesh, ring_layout=usp.layout))
    return table


def relative_errors(got, expected):
    """||got - expected|| / ||expected|| per tensor, each summed over all ranks' shards."""
    sums = torch.tensor([[(g.double() - e.double()).square().sum(), e.double().square().sum()]
                         for g, e in zip(got, expected)], device=got[0].device)
    dist.all_reduce(sums)
    return (sums[:, 0].sqrt() / sums[:, 1].sqrt().clamp(min=1e-30)).tolist()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed(args)
    from ring_adasplash import adasplash_func

    q, k, v = global_inputs(args, args.seqlen, device)
    grad_out = torch.randn(q.shape, generator=torch.Generator(device).manual_seed(args.seed + 1),
                           device=device, dtype=q.dtype)
    whole = [t.detach().requires_grad_() for t in (q, k, v)]
    out = adasplash_func(*whole, alpha=args.alpha, causal=True)
    one_gpu = [out.detach(), *torch.autograd.grad(out, whole, grad_out)]
    del whole, out

    rows, failed = [], False
    for name, (attention, shard) in strategies(world).items():
        local = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
        try:
            out = attention(*local, alpha=args.alpha, causal=True)
            got = [out.detach(), *torch.autograd.grad(out, local, shard(grad_out))]
            errors = relative_errors(got, [shard(t) for t in one_gpu])
            row = dict(strategy=name, out=errors[0], dq=errors[1], dk=errors[2], dv=errors[3])
            failed |= max(errors) > args.tol
        except Exception as exc:  # a strategy that cannot run here (heads, world size) is reported
            row, failed = dict(strategy=name, error=common.short_error(exc)), True
        rows.append(row)
        del local
    if rank == 0:
        print(f"S={args.seqlen} P={world} heads={args.heads} D={args.head_dim} {args.dtype} amp={args.amp} "
              f"alpha={args.alpha} on {common.device_name(device)}; relative error against one GPU (tol {args.tol})")
        print(common.markdown_table(rows, [("strategy", "strategy"), ("out", "out", ".2e"), ("dq", "dq", ".2e"),
                                           ("dk", "dk", ".2e"), ("dv", "dv", ".2e"), ("error", "error")]))
        print("FAILED" if failed else "all strategies agree with one GPU", flush=True)
    shutdown(1 if failed else 0)


if __name__ == "__main__":
    main()
