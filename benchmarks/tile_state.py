"""Bytes of per-tile state per rank under weak scaling: the memory that grows with S_local x S.

    torchrun --nproc_per_node 2 benchmarks/tile_state.py --local-seqlen 1024
    torchrun --nproc_per_node 4 benchmarks/tile_state.py --local-seqlen 1024

Runs one forward and backward of ring and zigzag entmax attention with ``--local-seqlen`` tokens
per rank (so the sequence grows with the world size) on the structured inputs, and prints, read
through ``ring_adasplash.telemetry``, the largest over the ranks of the bytes of per-tile state a
forward held at once (tile gaps, masks and tile lists of every key block, ``tile_state_bytes``)
and of the masks it kept for the backward (``saved_tile_bytes``), and both per (local query tile,
key tile, head). Under weak scaling, per-tile state that is streamed (a ring step keeping only the
maps of its own key block) stays constant per rank; state kept for every key block grows with the
world size.
"""
import argparse

import torch
import torch.distributed as dist

from common import init_ranks, print_header
from inputs import make_qkv
from ring_adasplash import telemetry
from ring_adasplash.comm import shutdown
from ring_adasplash.parallel import layouts, ring_adasplash_func, zigzag_ring_adasplash_func

TILE = 64  # query and key tile of the block mask


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local-seqlen", type=int, default=1024, help="tokens per rank (the sequence is this x world)")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--amp", type=float, default=1.5, help="amplitude of the positional code (higher: sparser)")
    args = p.parse_args()
    rank, world, device = init_ranks()
    cuda = device.type == "cuda"
    seqlen = args.local_seqlen * world
    if rank == 0:
        print_header(str(device), vars(args) | {"world_size": world, "seqlen": seqlen})
        print("\n| strategy | world | S | S_local | tile state, max over ranks (bytes) | per tile x head | "
              "kept for the backward (bytes) | per tile x head |\n|---|---|---|---|---|---|---|---|")
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = make_qkv("structured", 1, seqlen, args.heads, args.head_dim, args.amp, dtype, device)
    tiles = -(-args.local_seqlen // TILE) * -(-seqlen // TILE) * args.heads  # local query tiles x key tiles
    for name, layout, fn in (("ring", "contiguous", ring_adasplash_func), ("zigzag", "zigzag", zigzag_ring_adasplash_func)):
        local = [layouts.shard(t, layout, rank, world).detach().requires_grad_() for t in (q, k, v)]
        with telemetry.record() as t:
            out = fn(*local, alpha=1.5, causal=True)
            out.backward(torch.ones_like(out))
        held = torch.tensor([t.tile_state_bytes, t.saved_tile_bytes], dtype=torch.float64, device=device)
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        if rank == 0:
            state, saved = (int(x) for x in held.tolist())
            print(f"| {name} | {world} | {seqlen} | {args.local_seqlen} | {state} | {state / tiles:.2f} | {saved} | "
                  f"{saved / tiles:.2f} |")
    shutdown()


if __name__ == "__main__":
    main()
