"""Packed documents through the ring against the same documents as a batch (launch with torchrun).

    torchrun --nproc_per_node 2 benchmarks/bench_ring_packed.py --total 32768 --doc-lens 512,2048,8192,32768
    torchrun --nproc_per_node 2 benchmarks/bench_ring_packed.py --device cpu --total 1024 --doc-lens 256,1024 \\
        --heads 2 --head-dim 16 --dtype fp32

For each document length L, the --total tokens T as N = T / L documents of the same q, k, v:
    packed  ring_adasplash_varlen_func on the packed sequence, global cu_seqlens; rank r holds the
            packed tokens [r T / P, (r + 1) T / P) (documents may straddle ranks)
    batch   ring_adasplash_func on the documents as a batch (N, L); rank r holds tokens
            [r L / P, (r + 1) L / P) of every document
Both causal, alpha 1.5. Times: median over --iters of CUDA-event times (barrier before each),
max over ranks; "packed / batch" is the masks issue's measure (target <= 1.1). Bytes: what a
rank sent in one forward (ring_adasplash.telemetry), mean over ranks.
"""
import argparse
import functools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_distributed  # noqa: E402
import common  # noqa: E402
from inputs import make_qkv  # noqa: E402
from ring_adasplash import ring_adasplash_func, ring_adasplash_varlen_func  # noqa: E402
from ring_adasplash.comm import shutdown  # noqa: E402

COLUMNS = [("doc_len", "L"), ("docs", "documents"), ("world_size", "P"),
           ("packed_fwd_ms", "packed fwd ms", ".4g"), ("batch_fwd_ms", "batch fwd ms", ".4g"),
           ("ratio_fwd", "packed / batch fwd", ".3f"),
           ("packed_fwdbwd_ms", "packed fwd+bwd ms", ".4g"), ("batch_fwdbwd_ms", "batch fwd+bwd ms", ".4g"),
           ("ratio_fwdbwd", "packed / batch fwd+bwd", ".3f"),
           ("packed_mb_sent", "packed MiB sent/rank", ".4g"), ("batch_mb_sent", "batch MiB sent/rank", ".4g"),
           ("error", "error")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_input_arguments(p)
    p.add_argument("--total", type=int, default=32768, help="tokens of each call (all documents together)")
    p.add_argument("--doc-lens", type=common.csv_list(int), default=[512, 2048, 8192, 32768],
                   help="document lengths, comma-separated; each divides --total")
    p.add_argument("--modes", type=common.csv_list(str), default=["fwd", "fwdbwd"], help="fwd, fwdbwd, comma-separated")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per mode")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per mode")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv)")
    args = p.parse_args(argv)
    bad = [length for length in args.doc_lens if length < 1 or args.total % length]
    if bad:
        p.error(f"--doc-lens must divide --total ({args.total}); got {bad}")
    return args


def inputs(args, doc_len: int, rank: int, world: int, device):
    """This rank's packed (T/P, H, D) shards, its batch (N, L/P, H, D) shards, and the global cu_seqlens."""
    docs = args.total // doc_len
    q, k, v = make_qkv(args.family, docs, doc_len, args.heads, args.head_dim, args.amp, common.torch_dtype(args.dtype),
                       device, kv_heads=args.kv_heads, seed=args.seed)
    per_rank, doc_part = args.total // world, doc_len // world
    packed = [x.reshape(args.total, *x.shape[2:])[rank * per_rank:(rank + 1) * per_rank].contiguous() for x in (q, k, v)]
    batch = [x[:, rank * doc_part:(rank + 1) * doc_part].contiguous() for x in (q, k, v)]
    cu_seqlens = torch.arange(0, args.total + 1, doc_len, dtype=torch.int32, device=device)
    return packed, batch, cu_seqlens


def measure(args, doc_len: int, rank: int, world: int, device) -> dict:
    """Both layouts' times (max over ranks) and bytes sent (mean over ranks) at one document length."""
    row = {"doc_len": doc_len, "docs": args.total // doc_len, "world_size": world}
    if doc_len % world:
        return dict(row, error=f"a document of {doc_len} tokens does not split over {world} ranks (batch layout)")
    packed, batch, cu_seqlens = inputs(args, doc_len, rank, world, device)
    calls = {"packed": (functools.partial(ring_adasplash_varlen_func, cu_seqlens=cu_seqlens, alpha=common.ALPHA),
                        packed),
             "batch": (functools.partial(ring_adasplash_func, alpha=common.ALPHA), batch)}
    for name, (attn, tensors) in calls.items():
        for mode in args.modes:
            step = common.make_step(attn, mode, tensors)
            row[f"{name}_{mode}_ms"] = bench_distributed.median_ms(step, args, device, collective=True)
        sent = common.telemetry_call(common.make_step(attn, "fwd", tensors), device).get("bytes_sent")
        every_rank = [value for value in bench_distributed.gather(sent) if value is not None]
        row[f"{name}_mb_sent"] = sum(every_rank) / len(every_rank) / 2**20 if every_rank else None
    for mode in args.modes:
        row[f"ratio_{mode}"] = row[f"packed_{mode}_ms"] / row[f"batch_{mode}_ms"]
    return row


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = bench_distributed.init_distributed(args)
    header = None
    if rank == 0:
        header = common.print_header(device, {
            "world_size": world, "backend": dist.get_backend(), "family": args.family, "dtype": args.dtype,
            "total tokens": args.total, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
            "head_dim": args.head_dim, "amp": args.amp, "alpha": common.ALPHA,
            "timing": f"median of {args.iters} iters after {args.warmup} warmup, max over ranks"})
    rows = []
    for doc_len in args.doc_lens:
        row = measure(args, doc_len, rank, world, device)
        rows.append(row)
        if rank == 0:  # each row as soon as it is measured, so a cut-off run still reports
            print({key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()},
                  flush=True)
        bench_distributed.barrier(device)
    if rank == 0:
        common.write_report(args.out, f"ring_packed_{common.timestamp()}", header, common.markdown_table(rows, COLUMNS),
                            rows)
    shutdown()


if __name__ == "__main__":
    main()
