"""Zigzag ring attention over the ranks, checked against one device.

    torchrun --standalone --nproc_per_node 2 examples/sequence_parallel.py

Every rank builds the same global q, k, v from a fixed seed, keeps its zigzag shard, runs
``zigzag_ring_adasplash_func`` forward and backward, and gathers the output and the gradients;
rank 0 compares them with ``adasplash_func`` on the full sequence, prints the largest relative
differences and "ok".
Runs on CPU over gloo (seconds with the defaults) and on GPUs over NCCL (one GPU per rank).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ring_adasplash import adasplash_func, zigzag_ring_adasplash_func
from ring_adasplash.parallel import layouts
from ring_adasplash.comm import shutdown


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=256,
                        help="global sequence length; a multiple of 2 x the number of ranks (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="query heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=2,
                        help="key/value heads; divides --heads (GQA) (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=32, help="head dimension (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=1.5,
                        help="entmax alpha in (1, 2]; 2 is sparsemax (default: %(default)s)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # One GPU per rank over NCCL, in bfloat16; or CPU processes over gloo, in float32.
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # The same global tensors on every rank: (batch, seqlen, heads, head_dim), and the gradient of
    # the output that the backward pass starts from.
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, args.seqlen, heads, args.head_dim, generator=gen).to(device, dtype)
                     for heads in (args.heads, args.kv_heads, args.kv_heads, args.heads))

    # This rank's shard: chunks r and 2P - 1 - r of the sequence, and their global token positions
    # (what RoPE would take).
    q_local, k_local, v_local = (layouts.shard(x, "zigzag", rank, world).requires_grad_() for x in (q, k, v))
    positions = layouts.positions("zigzag", args.seqlen, rank, world, device=device)

    out_local = zigzag_ring_adasplash_func(q_local, k_local, v_local, alpha=args.alpha, causal=True)
    out_local.backward(layouts.shard(dout, "zigzag", rank, world))

    def gather(local: torch.Tensor) -> torch.Tensor:
        """The global tensor from every rank's zigzag shard."""
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local.detach().contiguous())
        return layouts.unshard(shards, "zigzag", world)

    results = [gather(t) for t in (out_local, q_local.grad, k_local.grad, v_local.grad)]
    if rank == 0:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out = adasplash_func(*full, alpha=args.alpha, causal=True)
        out.backward(dout)
        expected = [out] + [t.grad for t in full]
        errors = {name: ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                  for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected)}
        tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
        half = positions.numel() // 2
        print(f"world {world}: rank 0 holds positions {positions[0]}-{positions[half - 1]} and "
              f"{positions[half]}-{positions[-1]} of {args.seqlen}")
        print("max |ring - one device| / max |one device|: "
              + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
        if max(errors.values()) > tolerance:
            raise SystemExit(f"mismatch: an error is above {tolerance:.0e}")
        print("ok")
    shutdown()  # destroys the process group; see ring_adasplash.comm.shutdown


if __name__ == "__main__":
    main()
