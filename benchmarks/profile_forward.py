"""Where one forward (and backward) of adasplash_func spends its time, by kernel and by op.

    python benchmarks/profile_forward.py --seqlen 32768 --head-dim 64 --amp 1.5
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import common
from inputs import structured_qkv
from ring_adasplash import adasplash_func


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_case_arguments(p)
    p.add_argument("--backward", action="store_true", help="profile forward and backward")
    p.add_argument("--rows", type=int, default=25, help="rows of the kernel table to print")
    args = p.parse_args()
    q, k, v = structured_qkv(1, args.seqlen, args.heads, args.head_dim, args.amp, torch.bfloat16, "cuda")
    q, k, v = (t.requires_grad_(args.backward) for t in (q, k, v))

    def step():
        out = adasplash_func(q, k, v, alpha=1.5, causal=True)
        if args.backward:
            out.backward(torch.ones_like(out))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
