"""Single-GPU kernel benchmark: ring-adasplash vs SDPA (flash) vs AdaSplash 0.2.2.

Example:
    python benchmarks/bench_kernels.py --seqlens 8192,32768,65536 --head-dims 64,128 \
        --amps 1.0,1.5,2.0 --impls ours,sdpa,adasplash --modes fwd,fwdbwd

Impls (all causal, alpha = --alpha (default 1.5) for the entmax ones, default scale 1/sqrt(D)):
    ours       ring_adasplash.adasplash_func, layout (B, S, H, D); CUDA graphs as configured
               (default: at short sequences, see ring_adasplash/cuda_graphs.py)
    ours-eager the same with CUDA graphs off
    sdpa       torch SDPA restricted to the flash backend, (B, H, S, D) views of the same memory
    adasplash  adasplash.adasplash (its default AdaSplash-2 path), contiguous (B, H, S, D)
Times are medians of triton.testing.do_bench. TFLOP/s counts nonzero tiles only (see
common.attention_flops); the block sparsity measured by our kernel is used for both
entmax impls, 0 for SDPA. "vs sdpa" = t_sdpa / t_impl (> 1 means faster than SDPA).
"peak GiB" (CUDA): ``torch.cuda.max_memory_allocated`` over the timed steps, everything alive
then included (the inputs of the row, their gradients, buffers a CUDA graph keeps).
"""

import argparse
import gc
import itertools
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adasplash_precompile  # noqa: E402
import common  # noqa: E402
import inputs  # noqa: E402
from inputs import FAMILIES, make_qkv  # noqa: E402

ALPHA = common.ALPHA


def parse_args(argv=None):
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=common.csv_list(_row), default=None,
                   help="SEQLEN:HEAD_DIM:AMP,... cases to run, instead of the product of the three lists below")
    p.add_argument("--seqlens", type=common.csv_list(int), default=[8192, 32768, 65536],
                   help="sequence lengths, comma-separated")
    p.add_argument("--head-dims", type=common.csv_list(int), default=[64, 128], help="head dimensions, comma-separated")
    p.add_argument("--amps", type=common.csv_list(float), default=[1.0, 1.5, 2.0],
                   help="amplitudes, comma-separated (higher: sparser)")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: --heads)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--dtype", choices=sorted(common.DTYPE_NAMES), default="bf16", help="input dtype")
    p.add_argument("--impls", type=common.csv_list(str), default=["ours", "sdpa", "adasplash"],
                   help="implementations to time, comma-separated")
    p.add_argument("--modes", type=common.csv_list(str), default=["fwd", "fwdbwd"], help="fwd, fwdbwd, comma-separated")
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured",
                   help="input family of inputs.py: structured (local, amp sets the sparsity), sinkwindow, "
                        "scattered (content clusters, no locality) or mixed (half the heads of each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    common.add_alpha_arguments(p)
    p.add_argument("--alpha-step", type=float, default=0.0, metavar="STEP",
                   help="with --head-alphas: before each call, move the alphas of the heads not at 1.5 or 2 "
                        "by STEP in place, up and down in turn, as an optimizer step moves a learnable alpha; "
                        "0: held still")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (wall-clock timer)")
    p.add_argument("--captured", metavar="PATH", help="file of launch/train.py --capture for --family captured "
                                                     "(amp is then the layer)")
    p.add_argument("--adasplash-precompile", type=int, default=0, metavar="N",
                   help="before AdaSplash's first call of each row, compile its autotuning configurations in N "
                        "processes side by side (adasplash_precompile.py), so its own search finds them compiled; "
                        "0: off (its first call compiles them one after another: minutes at 8K, D 128)")
    p.add_argument("--warmup-ms", type=float, default=100.0,
                   help="warm-up time per measurement (ms, triton.testing.do_bench)")
    p.add_argument("--rep-ms", type=float, default=500.0, help="measured time per measurement (ms)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv, .png)")
    return common.check_alpha_arguments(p, p.parse_args(argv))


# ----------------------------------------------------------------------------- impls
def _adasplash(q, k, v):
    import adasplash

    return adasplash.adasplash(q, k, v, alpha=ALPHA, is_causal=True)


def _bshd(x):
    return x


def _bhsd_view(x):
    return x.transpose(1, 2)


def _bhsd_contiguous(x):
    return x.transpose(1, 2).contiguous()


# name -> (attention function, converter from the (B, S, H, D) inputs to its native layout)
IMPLS = {
    "ours": (common.ours_attention, _bshd),
    "ours-eager": (common.ours_attention, _bshd),  # step wrapped by common.without_cuda_graphs
    "sdpa": (common.sdpa_flash, _bhsd_view),
    "adasplash": (_adasplash, _bhsd_contiguous),
}


def make_step(impl, mode, q, k, v):
    """One ``mode`` step of ``impl``; layout conversion happens here, outside the timed region."""
    attn, convert = IMPLS[impl]
    step = common.make_step(attn, mode, [convert(x) for x in (q, k, v)])
    return common.without_cuda_graphs(step) if impl == "ours-eager" else step


# ----------------------------------------------------------------------------- timing
def median_ms(fn, device, warmup_ms, rep_ms):
    """Median time of ``fn`` in ms: triton's do_bench on CUDA, a wall-clock loop on CPU."""
    if str(device).startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    estimate = max(common.wall_ms(fn, device), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = sorted(common.wall_ms(fn, device) for _ in range(max(1, int(rep_ms / estimate))))
    return times[len(times) // 2]


def median_and_peak(fn, device, warmup_ms, rep_ms):
    """``median_ms`` of ``fn`` and, on CUDA, the peak memory in GiB over the timed calls (everything
    alive then included: inputs, gradients, buffers a CUDA graph keeps); None on CPU."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(fn, device, warmup_ms, rep_ms)
    return ms, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def measured_sparsity(step, device):
    """Block sparsity (fraction of visible tiles all zero) of one extra, untimed call inside our
    telemetry recorder (``ring_adasplash.telemetry``)."""
    return common.telemetry_call(step, device)["block_sparsity"]


def bench_one(impl, mode, qkv, args):
    """Time one (impl, mode) on inputs ``qkv``; return the measured fields of a row."""
    row = {}
    try:
        step = make_step(impl, mode, *qkv)
        if impl == "ours":  # the first call compiles our kernels (nothing is autotuned)
            row["first_call_ms"] = common.wall_ms(step, args.device)
            row["block_sparsity"] = measured_sparsity(step, args.device)
        row["ms"], row["peak_gib"] = median_and_peak(step, args.device, args.warmup_ms, args.rep_ms)
    except Exception as exc:  # missing package, OOM, unsupported shape...
        row["error"] = common.short_error(exc)
    finally:
        step = None
        gc.collect()
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- driver
def _row(text: str) -> tuple:
    seqlen, head_dim, amp = text.split(":")
    return int(seqlen), int(head_dim), float(amp)


def tasks(args):
    """(seqlen, head_dim, amp, impl, mode) tuples, over ``--rows`` or the product of the lists;
    SDPA does not depend on amp, so it runs once per (seqlen, head_dim)."""
    out, sdpa_done = [], set()
    cases = args.rows or list(itertools.product(args.seqlens, args.head_dims, args.amps))
    for seqlen, head_dim, amp in cases:
        for impl, mode in itertools.product(args.impls, args.modes):
            if impl == "sdpa":
                if (seqlen, head_dim, mode) in sdpa_done:
                    continue
                sdpa_done.add((seqlen, head_dim, mode))
            out.append((seqlen, head_dim, amp, impl, mode))
    return out


def add_derived(rows, args):
    """Fill TFLOP/s (nonzero work) and the speed ratio against SDPA."""
    measured = [r for r in rows if r["impl"] == "ours" and r.get("block_sparsity") is not None]
    sparsity = {(r["seqlen"], r["head_dim"], r["amp"]): r["block_sparsity"]  # fwd value wins
                for r in sorted(measured, key=lambda r: r["mode"] == "fwd")}
    sdpa = {(r["seqlen"], r["head_dim"], r["mode"]): r.get("ms") for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        if r["impl"] == "sdpa":
            r["amp"] = "any"
            s = 0.0
        else:
            s = sparsity.get((r["seqlen"], r["head_dim"], r["amp"]))
            r["block_sparsity"] = s
        if r.get("ms") and s is not None:
            flops = common.attention_flops(args.batch, args.heads, r["head_dim"], r["seqlen"], s, r["mode"])
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        base = sdpa.get((r["seqlen"], r["head_dim"], r["mode"]))
        if r.get("ms") and base:
            r["vs_sdpa"] = base / r["ms"]


# Dense Q.K^T passes in one forward: ours runs the max pass densely and everything else on the
# block mask (ring_adasplash/kernels/algorithm.py); AdaSplash-2 runs max, histogram,
# Halley + mask densely before its sparse output pass; flash attention runs one.
DENSE_QK_PASSES = {"ours": 1, "ours-eager": 1, "adasplash": 4, "sdpa": 1}

COLUMNS = [("impl", "impl"), ("mode", "mode"), ("seqlen", "S"), ("head_dim", "D"), ("amp", "amp"),
           ("dense_passes", "dense QK passes"),
           ("ms", "median ms", ".4g"), ("first_call_ms", "first call ms", ".4g"),
           ("block_sparsity", "block sparsity", ".3f"), ("tflops", "TFLOP/s (nnz)", ".3g"),
           ("vs_sdpa", "vs sdpa", ".2f"), ("peak_gib", "peak GiB", ".3g"), ("error", "error")]


def main(argv=None):
    """Run all configurations and write the report."""
    global ALPHA
    args = parse_args(argv)
    inputs.CAPTURED_PATH = args.captured
    ALPHA = common.ALPHA = args.alpha  # read by common.ours_attention and _adasplash at each call
    common.HEAD_ALPHAS = common.head_alphas(args.head_alphas, args.alpha, args.heads)
    if args.alpha_step and common.HEAD_ALPHAS is None:
        raise ValueError("--alpha-step needs --head-alphas (same or LO:HI)")
    common.ALPHA_STEP = args.alpha_step
    common.DEVICE_ALPHA = args.device_alpha
    header = common.print_header(args.device, {
        "family": args.family, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
        "kv_heads": args.kv_heads or args.heads, "alpha": ALPHA,
        "head alphas (ours)": common.HEAD_ALPHAS or "none", "alpha step (ours)": args.alpha_step})
    dtype = common.torch_dtype(args.dtype)
    rows, cached_key, qkv, precompiled = [], None, None, set()
    for seqlen, head_dim, amp, impl, mode in tqdm(tasks(args), desc="kernels", file=sys.stderr):
        if (seqlen, head_dim, amp) != cached_key:
            qkv = None
            qkv = make_qkv(args.family, args.batch, seqlen, args.heads, head_dim, amp, dtype,
                           args.device, kv_heads=args.kv_heads, seed=args.seed)
            cached_key = (seqlen, head_dim, amp)
        if impl == "adasplash" and args.adasplash_precompile and (seqlen, head_dim, amp) not in precompiled:
            seconds = adasplash_precompile.precompile(args.family, seqlen, head_dim, amp, args.adasplash_precompile,
                                                      args)
            tqdm.write(f"adasplash precompiled for {seqlen}:{head_dim}:{amp} in {seconds:.1f} s")
            precompiled.add((seqlen, head_dim, amp))
        row = {"impl": impl, "mode": mode, "seqlen": seqlen, "head_dim": head_dim, "amp": amp}
        row.update(bench_one(impl, mode, qkv, args))
        row["dense_passes"] = DENSE_QK_PASSES[impl]
        rows.append(row)
        tqdm.write("row " + str({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    add_derived(rows, args)
    order = {name: i for i, name in enumerate(args.impls)}
    rows.sort(key=lambda r: (r["mode"], r["head_dim"], r["seqlen"], str(r["amp"]), order[r["impl"]]))

    def plot(path):
        common.plot_panels(rows, path, "seqlen", "ms",
                           panel_of=lambda r: f"{r['mode']}  D={r['head_dim']}",
                           line_of=lambda r: r["impl"] if r["impl"] == "sdpa" else f"{r['impl']} amp={r['amp']}",
                           xlabel="sequence length", ylabel="median time (ms)",
                           title=f"attention kernels on {common.device_name(args.device)} ({args.family}, "
                                 f"{args.dtype}, H={args.heads})")

    common.write_report(args.out, f"kernels_{common.timestamp()}", header,
                        common.markdown_table(rows, COLUMNS), rows, plot)


if __name__ == "__main__":
    main()
