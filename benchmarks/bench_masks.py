"""Single-GPU masks: a sliding window and packed documents, ring-adasplash vs dense kernels.

Example:
    python benchmarks/bench_masks.py --cases window,packed --seqlen 131072 --window 4096 \
        --doc-lens 512,2048,8192,32768 --total 32768 --modes fwd,fwdbwd

window: one sequence of S (--seqlen) tokens; query i sees the W (--window) keys i - W + 1 .. i,
itself included: flash-attn's window_size=(W - 1, 0) together with causal.
    ours-window   ring_adasplash.adasplash_func(..., causal=True, window_size=(W - 1, 0))
    ours-causal   the same without a window (full causal), same inputs
    flex-window   torch.compile(flex_attention) (softmax) with a BlockMask of
                  (q_idx >= kv_idx) & (q_idx - kv_idx < W) from create_block_mask (128 x 128 blocks,
                  built once, untimed); on CPU it runs eager, as flex-window-eager
    flash-window  flash_attn_func(..., causal=True, window_size=(W - 1, 0)), only if flash_attn imports
    sdpa-causal   torch SDPA, flash backend, full causal (on CPU: sdpa-math-causal, the math backend)
packed: --total tokens as N = total / L documents of L tokens, for each L of --doc-lens; causal.
    ours-packed   ring_adasplash.adasplash_varlen_func on the (N * L, H, D) packing, cu_seqlens 0, L, .., N * L
    ours-batch    ring_adasplash.adasplash_func on (N, L, H, D), the same memory
    sdpa-batch    torch SDPA, flash backend, on (N, H, L, D) views (on CPU: sdpa-math-batch)
Inputs: inputs.py's --family (structured by default) at --amp (packed: each document is one batch entry
of it, so positions restart at 0 in every document), batch 1 for window. Entmax alpha = 1.5, scale 1/sqrt(D).
Times are medians of triton.testing.do_bench (a wall-clock loop on CPU); fwd runs under no_grad,
fwd+bwd calls autograd.grad on q, k, v. "first call ms": the row's first call, compilation included
(Triton for ours, Inductor for flex). "x ours-window" / "x ours-batch" = t_impl / t_ref (< 1: faster
than ours); on the ours-packed row it is the cost of packing. Our CUDA graphs stay on their default
(ring_adasplash/cuda_graphs.py: by batch * heads * Sq * Sk), as in a user's call: the batch of short
documents runs its forward as a graph, the packing (one sequence of N * L tokens) does not. "peak GiB" (CUDA):
torch.cuda.max_memory_allocated over the timed steps, the case's inputs and the row's gradients included.
--kernels N (CUDA): each row's device time per call and its N costliest kernels (torch.profiler,
five calls), listed after the tables.
"""

import argparse
import functools
import gc
import importlib.util
import os
import sys
import warnings

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_kernels import median_and_peak  # noqa: E402
from inputs import make_qkv  # noqa: E402

import ring_adasplash  # noqa: E402

ALPHA = common.ALPHA
REFERENCE = {"window": "ours-window", "packed": "ours-batch"}  # the row each case's ratio divides by


def parse_args(argv=None):
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=common.csv_list(str), default=["window", "packed"],
                   help="window, packed, comma-separated")
    p.add_argument("--seqlen", type=int, default=131072, help="window case: sequence length")
    p.add_argument("--window", type=int, default=4096,
                   help="window case: keys each query sees, itself included (window_size=(W - 1, 0))")
    p.add_argument("--doc-lens", type=common.csv_list(int), default=[512, 2048, 8192, 32768],
                   help="packed case: document lengths, comma-separated")
    p.add_argument("--total", type=int, default=32768, help="packed case: tokens in all documents together")
    p.add_argument("--heads", type=int, default=16, help="query and key/value heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--family", choices=("structured", "scattered"), default="structured",
                   help="input family of inputs.py: structured (local) or scattered (content clusters, no locality)")
    p.add_argument("--amp", type=float, default=1.0, help="amplitude of the inputs (higher: sparser)")
    p.add_argument("--dtype", choices=sorted(common.DTYPE_NAMES), default="bf16", help="input dtype")
    p.add_argument("--impls", type=common.csv_list(str), default=None,
                   help="implementations to time, comma-separated (default: every one of the chosen cases)")
    p.add_argument("--modes", type=common.csv_list(str), default=["fwd", "fwdbwd"], help="fwd, fwdbwd, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test (wall-clock timer)")
    p.add_argument("--warmup-ms", type=float, default=100.0,
                   help="warm-up time per measurement (ms, triton.testing.do_bench)")
    p.add_argument("--rep-ms", type=float, default=500.0, help="measured time per measurement (ms)")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="CUDA: also list each row's N costliest kernels (device ms per call, torch.profiler)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv, .png)")
    args = p.parse_args(argv)
    if set(args.cases) - set(REFERENCE):
        p.error(f"--cases takes {', '.join(REFERENCE)}; got {','.join(args.cases)}")
    if "packed" in args.cases and any(args.total % n for n in args.doc_lens):
        p.error(f"--total ({args.total}) must be a multiple of every --doc-lens")
    return args


# ----------------------------------------------------------------------------- impls
# Each impl is prepare(q, k, v) -> (attention function, its inputs), from the case's tensors:
# (1, S, H, D) for window, (N, L, H, D) for packed. Conversions and mask building happen in
# prepare, outside the timed step.
def _bhsd(q, k, v):
    return [x.transpose(1, 2) for x in (q, k, v)]


def _sdpa(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def prepare_sdpa(cuda, q, k, v):
    from torch.nn.attention import SDPBackend

    backend = SDPBackend.FLASH_ATTENTION if cuda else SDPBackend.MATH
    return functools.partial(_sdpa, backend), _bhsd(q, k, v)


def prepare_ours_window(window, q, k, v):
    return functools.partial(ring_adasplash.adasplash_func, alpha=ALPHA, causal=True,
                             window_size=(window - 1, 0)), [q, k, v]


def prepare_ours_causal(q, k, v):
    return functools.partial(ring_adasplash.adasplash_func, alpha=ALPHA, causal=True), [q, k, v]


@functools.lru_cache(maxsize=None)
def _flex_window_mask(seqlen, window, device, compiled):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    # compiled, create_block_mask evaluates the mask block by block; eager, it materialises S x S
    build = torch.compile(create_block_mask) if compiled else create_block_mask
    return build(sliding_window, None, None, seqlen, seqlen, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # eager flex_attention materialises the scores


def prepare_flex_window(window, cuda, q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    mask = _flex_window_mask(q.shape[1], window, str(q.device), cuda)
    if not cuda:  # eager on purpose: on CPU this is a smoke test, and compiling would take longer
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    attn = _compiled_flex() if cuda else flex_attention
    return functools.partial(attn, block_mask=mask), _bhsd(q, k, v)


def prepare_flash_window(window, q, k, v):
    from flash_attn import flash_attn_func

    return functools.partial(flash_attn_func, causal=True, window_size=(window - 1, 0)), [q, k, v]


def prepare_ours_packed(q, k, v):
    docs, doc_len = q.shape[:2]
    cu_seqlens = torch.arange(0, docs * doc_len + 1, doc_len, dtype=torch.int32, device=q.device)
    attn = functools.partial(ring_adasplash.adasplash_varlen_func, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                             max_seqlen_q=doc_len, max_seqlen_k=doc_len, alpha=ALPHA, causal=True)
    return attn, [x.view(docs * doc_len, *x.shape[2:]) for x in (q, k, v)]  # same memory, packed


def case_impls(case, args):
    """name -> prepare, in row order, for ``case`` on ``args.device``."""
    cuda = str(args.device).startswith("cuda")
    sdpa, flex = ("sdpa", "flex-window") if cuda else ("sdpa-math", "flex-window-eager")
    if case == "window":
        impls = {"ours-window": functools.partial(prepare_ours_window, args.window),
                 "ours-causal": prepare_ours_causal,
                 flex: functools.partial(prepare_flex_window, args.window, cuda)}
        if cuda and importlib.util.find_spec("flash_attn") is not None:
            impls["flash-window"] = functools.partial(prepare_flash_window, args.window)
        impls[f"{sdpa}-causal"] = functools.partial(prepare_sdpa, cuda)
    else:
        impls = {"ours-packed": prepare_ours_packed, "ours-batch": prepare_ours_causal,
                 f"{sdpa}-batch": functools.partial(prepare_sdpa, cuda)}
    return {name: prep for name, prep in impls.items() if args.impls is None or name in args.impls}


# ----------------------------------------------------------------------------- timing
def bench_one(prepare, mode, qkv, args):
    """Time one (impl, mode) on the case's inputs ``qkv``; return the measured fields of a row."""
    row, cuda = {}, str(args.device).startswith("cuda")
    try:
        attn, tensors = prepare(*qkv)
        step = common.make_step(attn, mode, tensors)
        row["first_call_ms"] = common.wall_ms(step, args.device)
        row["ms"], row["peak_gib"] = median_and_peak(step, args.device, args.warmup_ms, args.rep_ms)
        if args.kernels and cuda:
            row["device_ms"], by_kernel = common.device_ms_by_kernel(step)
            row["kernels"] = by_kernel.most_common(args.kernels)
    except Exception as exc:  # missing package or feature, OOM, unsupported shape...
        row["error"] = common.short_error(exc)
    finally:
        attn = tensors = step = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- driver
def case_inputs(case, key, args):
    """window: (1, S, H, D); packed: the N documents of length ``key`` as (N, L, H, D)."""
    batch, seqlen = (1, args.seqlen) if case == "window" else (args.total // key, key)
    return make_qkv(args.family, batch, seqlen, args.heads, args.head_dim, args.amp, common.torch_dtype(args.dtype),
                    args.device, seed=args.seed)


def tasks(args):
    """(case, key, impl, prepare, mode): key is W for window, the document length for packed."""
    out = []
    for case in args.cases:
        keys = [args.window] if case == "window" else args.doc_lens
        for key in keys:
            for mode in args.modes:
                out += [(case, key, impl, prepare, mode) for impl, prepare in case_impls(case, args).items()]
    return out


def add_ratios(rows):
    """t_impl / t_reference of the same case, key and mode (REFERENCE names the reference impl)."""
    ref = {(r["case"], r["key"], r["mode"]): r.get("ms") for r in rows if r["impl"] == REFERENCE[r["case"]]}
    for r in rows:
        base = ref.get((r["case"], r["key"], r["mode"]))
        if r.get("ms") and base:
            r["ratio"] = r["ms"] / base


COMMON_COLUMNS = [("ms", "median ms", ".4g"), ("first_call_ms", "first call ms", ".4g")]
COLUMNS = {
    "window": [("impl", "impl"), ("mode", "mode"), ("seqlen", "S"), ("key", "W"), *COMMON_COLUMNS,
               ("ratio", "x ours-window", ".3f"), ("peak_gib", "peak GiB", ".3g"), ("error", "error")],
    "packed": [("impl", "impl"), ("mode", "mode"), ("key", "L"), ("docs", "N docs"), ("seqlen", "total"),
               *COMMON_COLUMNS, ("ratio", "x ours-batch", ".3f"), ("peak_gib", "peak GiB", ".3g"),
               ("error", "error")],
}


def main(argv=None):
    """Run the chosen cases and write the report."""
    args = parse_args(argv)
    header = common.print_header(args.device, {
        "family": args.family, "amp": args.amp, "dtype": args.dtype, "heads": args.heads,
        "head_dim": args.head_dim, "alpha": ALPHA})
    rows, cached_key, qkv = [], None, None
    for case, key, impl, prepare, mode in tqdm(tasks(args), desc="masks", file=sys.stderr):
        if (case, key) != cached_key:
            qkv = None  # free the previous case's inputs first
            qkv = case_inputs(case, key, args)
            cached_key = (case, key)
        row = {"case": case, "impl": impl, "mode": mode, "key": key,
               "seqlen": args.seqlen if case == "window" else args.total}
        if case == "packed":
            row["docs"] = args.total // key
        row.update(bench_one(prepare, mode, qkv, args))
        rows.append(row)
        tqdm.write("row " + str({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    add_ratios(rows)
    tables = []
    for case in args.cases:
        case_rows = [r for r in rows if r["case"] == case]
        title = (f"window: S = {args.seqlen}, W = {args.window}" if case == "window"
                 else f"packed: {args.total} tokens in documents of L tokens")
        tables.append(f"### {title}\n\n" + common.markdown_table(case_rows, COLUMNS[case]))
    listed = [r for r in rows if r.get("kernels")]
    if listed:  # the kernels of each row, after the tables
        tables.append("### Device ms per call by kernel\n\n" + "\n\n".join(
            f"{r['case']} {r['key']}, {r['impl']}, {r['mode']}: {r['device_ms']:.3f} ms on the device\n\n"
            + "\n".join(f"    {ms:8.3f}  {name[:100]}" for name, ms in r["kernels"]) for r in listed))
        for r in listed:  # the csv keeps one line a row
            r["kernels"] = "; ".join(f"{name[:60]}={ms:.3f}" for name, ms in r["kernels"])
    packed_rows = [r for r in rows if r["case"] == "packed"]

    def plot(path):
        common.plot_panels(packed_rows, path, "key", "ms", panel_of=lambda r: r["mode"], line_of=lambda r: r["impl"],
                           xlabel="document length L", ylabel="median time (ms)",
                           title=f"{args.total} packed tokens on {common.device_name(args.device)} "
                                 f"({args.dtype}, H={args.heads}, D={args.head_dim})")

    common.write_report(args.out, f"masks_{common.timestamp()}", header, "\n\n".join(tables), rows,
                        plot if packed_rows else None)


if __name__ == "__main__":
    main()
