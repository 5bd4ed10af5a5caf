"""Peak memory of one fwd+bwd on one GPU as the sequence grows: ours against SDPA (flash).

    python3 benchmarks/bench_memory.py --seqlens 131072,262144,524288,1048576 --impls ours,sdpa
    python3 benchmarks/bench_memory.py --seqlens 131072,262144 --family scattered --amp 1.0 --impls ours
    python3 benchmarks/bench_memory.py --device cpu --seqlens 512,1024 --heads 2 --head-dim 32   # a smoke run

Per (impl, S): q, k, v (B=1, bf16, layout (B, S, H, D)) and an output gradient are made, the
peak counter is reset, and ``--calls`` fwd+bwd calls run (the gradients of q, k, v by
``torch.autograd.grad``; ours after one more call, recorded by ``telemetry`` for the tile state,
whose records hold the masks: the peak is that of plain calls). Columns: ``peak GiB`` (``torch.cuda.max_memory_allocated`` over the
calls, everything alive included: inputs, output gradient, the gradients returned), ``floor
GiB`` (what any exact attention must hold at once: q, k, v, out, dout and dq, dk, dv in the
input dtype: 8 x S x H x D x 2 bytes), ``peak / floor``, ``tile state GiB`` (ours: the largest
per-tile state one forward held, ``telemetry.tile_state_bytes``: tile gaps, masks, tile lists),
``ms`` (the fastest call, wall clock between synchronizations) and ``block sparsity`` (ours).
A configuration that runs out of memory is reported as ``OOM``. Kernels are compiled first at
``--warm-seqlen`` tokens, so no row's time or peak includes compilation. On CPU only the times
are measured.
"""
import argparse
import math
import os
import re
import traceback

import torch

import common
from inputs import FAMILIES, make_qkv

GIB = 2.0 ** 30


def floor_bytes(seqlen: int, heads: int, head_dim: int, itemsize: int) -> int:
    """q, k, v, out, dout, dq, dk, dv of one (1, S, H, D) problem in the input dtype."""
    return 8 * seqlen * heads * head_dim * itemsize


def attention(impl: str):
    """(B, S, H, D) -> (B, S, H, D) causal attention of ``impl``."""
    if impl == "ours":
        return common.ours_attention
    return lambda q, k, v: common.sdpa_flash(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def measure(impl: str, args, seqlen: int, device: torch.device) -> dict:
    """One row: peak, time and (ours) per-tile state of ``--calls`` fwd+bwd calls at ``seqlen``."""
    from ring_adasplash import telemetry

    cuda = device.type == "cuda"
    dtype = common.torch_dtype(args.dtype)
    row = {"impl": impl, "seqlen": seqlen, "family": args.family, "amp": args.amp,
           "floor_gib": floor_bytes(seqlen, args.heads, args.head_dim, torch.finfo(dtype).bits // 8) / GIB}
    q = k = v = grad_out = None
    try:
        q, k, v = (x.requires_grad_() for x in make_qkv(args.family, 1, seqlen, args.heads, args.head_dim, args.amp,
                                                         dtype, device))
        grad_out = torch.randn_like(q)
        attn = attention(impl)

        def step():  # the gradients live until the call returns, as in a training step
            torch.autograd.grad(attn(q, k, v), (q, k, v), grad_out)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        if impl == "ours":  # a call of its own: recording keeps the masks and counts tiles
            with telemetry.record() as t:
                times.append(common.wall_ms(step, device))
            row["tile_state_gib"] = t.tile_state_bytes / GIB
            row["block_sparsity"] = t.block_sparsity
            del t
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.calls):
            times.append(common.wall_ms(step, device))
        row["ms"] = min(times)
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            row["peak_vs_floor"] = row["peak_gib"] / row["floor_gib"]
    except torch.OutOfMemoryError as error:
        # what failed to fit, and where: the allocation's size and the innermost frames
        asked = re.search(r"Tried to allocate ([0-9.]+ [KMG]iB)", str(error))
        row["error"] = f"OOM ({asked.group(1)} asked)" if asked else "OOM"
        traceback.print_exc(limit=-4)
    finally:
        del q, k, v, grad_out
        if cuda:
            torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=common.csv_list(int), default=[131072, 262144, 524288, 1048576],
                   help="sequence lengths (tokens), comma-separated")
    p.add_argument("--impls", type=common.csv_list(str), default=["ours", "sdpa"], help="ours, sdpa, comma-separated")
    p.add_argument("--sdpa-max-seqlen", type=int, default=1 << 30,
                   help="longest sequence SDPA runs at (its fwd+bwd takes about a minute at 1M tokens on one H200)")
    p.add_argument("--family", choices=sorted(f for f in FAMILIES if f != "captured"), default="structured",
                   help="input family of inputs.py")
    p.add_argument("--amp", type=float, default=1.5, help="amplitude of the positional code (higher: sparser)")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="input dtype")
    p.add_argument("--alpha", type=float, default=1.5, help="entmax alpha of ours")
    p.add_argument("--calls", type=int, default=2, help="fwd+bwd calls per row (the fastest is reported)")
    p.add_argument("--warm-seqlen", type=int, default=8192, help="tokens of the compiling call before the rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory of the report (.md, .csv, .png)")
    args = p.parse_args()
    unknown = sorted(set(args.impls) - {"ours", "sdpa"})
    if unknown:
        p.error(f"--impls: expected ours and/or sdpa; got {', '.join(unknown)}")
    if args.calls < 1:
        p.error(f"--calls must be at least 1; got {args.calls}")
    device = torch.device(args.device)
    if device.type != "cuda":
        args.impls = [impl for impl in args.impls if impl != "sdpa"]  # flash attention needs a GPU
    common.ALPHA = args.alpha
    header = common.print_header(str(device), {key: value for key, value in vars(args).items() if key != "out"})
    for impl in args.impls:  # compile (and load) every kernel before the first measured row
        measure(impl, args, args.warm_seqlen, device)
    rows = []
    for seqlen in args.seqlens:
        for impl in args.impls:
            if impl == "sdpa" and seqlen > args.sdpa_max_seqlen:
                continue
            row = measure(impl, args, seqlen, device)
            rows.append(row)
            print(f"{impl} S={seqlen}: " + ", ".join(f"{key} {common.fmt(value)}" for key, value in row.items()
                                                     if key not in ("impl", "seqlen")), flush=True)
    columns = [("impl", "impl"), ("seqlen", "S", "d"), ("block_sparsity", "block sparsity"),
               ("ms", "ms (fwd+bwd)"), ("peak_gib", "peak GiB"), ("floor_gib", "floor GiB"),
               ("peak_vs_floor", "peak / floor"), ("tile_state_gib", "tile state GiB"), ("error", "error")]
    table = common.markdown_table(rows, columns)

    def plot(path):
        common.plot_panels(rows, path, "seqlen", "peak_gib", lambda r: f"{r['family']} amp {r['amp']:g}",
                           lambda r: r["impl"], "tokens", "peak GiB (fwd+bwd)", "Peak memory on one GPU")

    plot_fn = plot if any(not math.isnan(r.get("peak_gib", float("nan"))) for r in rows) else None
    common.write_report(args.out, f"memory_{common.timestamp()}", header, table, rows, plot_fn)


if __name__ == "__main__":
    main()
