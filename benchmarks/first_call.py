"""Seconds to the first forward and backward of a fresh process (compilation included).

    rm -rf ~/.triton/cache && python benchmarks/first_call.py --seqlen 32768 --head-dim 64 --amp 1.5

Nothing is autotuned: each kernel compiles once per configuration, so with Triton's on-disk
cache empty this is the cold start a user sees; run it again for the warm-cache start.
"""
import argparse
import os
import sys
import time

START = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import common  # noqa: E402
from inputs import structured_qkv  # noqa: E402
from ring_adasplash import adasplash_func  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_case_arguments(p)
    args = p.parse_args()
    q, k, v = (t.requires_grad_() for t in structured_qkv(1, args.seqlen, args.heads, args.head_dim, args.amp,
                                                          torch.bfloat16, "cuda"))
    grad = torch.randn_like(q)
    torch.cuda.synchronize()
    ready = time.time()
    out = adasplash_func(q, k, v)
    torch.cuda.synchronize()
    forward = time.time()
    out.backward(grad)
    torch.cuda.synchronize()
    done = time.time()
    print(f"{torch.cuda.get_device_name()}, S {args.seqlen}, D {args.head_dim}, amp {args.amp}: imports and inputs "
          f"{ready - START:.2f} s, first forward {forward - ready:.2f} s, first backward {done - forward:.2f} s, "
          f"first forward + backward {done - ready:.2f} s")


if __name__ == "__main__":
    main()
