"""Sequence-parallel attention benchmark (launch with torchrun).

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --seqlens 65536,131072
    python benchmarks/bench_distributed.py --device cpu --seqlens 512 --heads 4 --head-dim 32 --dtype fp32

Strategies, side by side in one run (all causal; entmax ones use alpha = 1.5):
    onegpu     ours on the full sequence, rank 0 only (baseline of our strategies)
    sdpa1      torch SDPA (flash) on the full sequence, rank 0 only (baseline of torch_cp)
    ring, zigzag, allgather, ulysses
               ring_adasplash.parallel.*_adasplash_func on local shards (see OURS)
    uspUxR     usp_adasplash_func on a U x R mesh (U * R = P; zigzag ring), e.g. usp2x1, usp1x2
    torch_cp   torch.distributed.tensor.experimental.context_parallel around SDPA (flash),
               its own head-tail load-balanced sharding, KV rotation set by --cp-rotate
    flex1      with --window only: torch.compile(flex_attention) (softmax) with the same window
               on the full sequence, rank 0 only (eager on CPU): the windowed dense baseline
With --window W, query i sees keys i - W + 1 .. i (window_size=(W - 1, 0) with causal) in every
entmax strategy and in onegpu; sdpa1 and torch_cp have no window and are refused.
Every rank builds the same global inputs (same seed) and keeps its own shard. Times are
the median over --iters of CUDA-event times (barrier before each iteration), max over
ranks. efficiency = t_1gpu / (P * t_P) (strong scaling). Bytes and block sparsity come
from ring_adasplash.telemetry (mean over ranks, one call per mode); peak memory is
torch.cuda.max_memory_allocated, max over ranks.
"""

import argparse
import contextlib
import datetime
import functools
import gc
import os
import re
import statistics
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_masks import prepare_flex_window  # noqa: E402
from inputs import make_qkv  # noqa: E402
from ring_adasplash.config import STRATEGIES, one_group_strategies  # noqa: E402
from ring_adasplash.comm import shutdown  # noqa: E402

# our strategies on one process group, from the library's one table (function, shard layout)
OURS = {s.name: s for s in one_group_strategies(include_missing=True) if s.package is None}
SINGLE = ("onegpu", "sdpa1", "flex1")  # run on rank 0 only, world_size reported as 1
BASELINE = {"torch_cp": "sdpa1", **{name: "onegpu" for name in OURS}}
ALL_IMPLS = ["onegpu", "sdpa1"] + list(OURS) + ["torch_cp"]  # the default: no window
WINDOWED_IMPLS = ["onegpu", "flex1"] + list(OURS)  # the default with --window
NO_WINDOW = ("sdpa1", "torch_cp")  # softmax baselines without a window argument
USP = re.compile(r"usp(\d+)x(\d+)$")


def is_ours(name):
    """A strategy of this library (telemetry available), not a baseline."""
    return name in OURS or USP.match(name) is not None


def baseline_of(name):
    return "onegpu" if USP.match(name) else BASELINE.get(name)
SHARD = "ring_adasplash.parallel.layouts:shard"


def parse_args(argv=None):
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=common.csv_list(int), default=[65536, 131072],
                   help="sequence lengths, comma-separated")
    common.add_input_arguments(p)
    p.add_argument("--impls", type=common.csv_list(str), default=None,
                   help=f"implementations to time, comma-separated (default: {','.join(ALL_IMPLS)}; with "
                        f"--window: {','.join(WINDOWED_IMPLS)})")
    p.add_argument("--window", type=int, default=None,
                   help="keys each query sees, itself included (window_size=(W - 1, 0) with causal); "
                        "default: full causal")
    p.add_argument("--modes", type=common.csv_list(str), default=["fwd", "fwdbwd"], help="fwd, fwdbwd, comma-separated")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per mode")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per mode")
    p.add_argument("--cp-rotate", choices=["alltoall", "allgather"], default="alltoall",
                   help="torch_cp KV rotation (torch's set_rotate_method)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv, .png)")
    args = p.parse_args(argv)
    if args.window is not None and args.window < 1:
        p.error(f"--window must be a number of keys >= 1; got {args.window}")
    if args.impls is None:
        args.impls = ALL_IMPLS if args.window is None else WINDOWED_IMPLS
    known = ALL_IMPLS + ["flex1"]
    unknown = {name for name in args.impls if name not in known and not USP.match(name)}
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; choose from {known} or uspUxR (e.g. usp2x1)")
    if args.window is None and "flex1" in args.impls:
        p.error("--impls flex1 is the windowed baseline: give --window W with it")
    if args.window is not None and set(args.impls) & set(NO_WINDOW):
        p.error(f"--impls {sorted(set(args.impls) & set(NO_WINDOW))} take no window; with --window choose from "
                f"{WINDOWED_IMPLS} or uspUxR")
    # baselines first, then the named strategies in the order given
    args.impls = [name for name in SINGLE if name in args.impls] + [n for n in args.impls if n not in SINGLE]
    return args


# ----------------------------------------------------------------------------- process group
def init_distributed(args):
    """Initialise the default group (works without torchrun as a 1-process group)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.timeout_min))
    return dist.get_rank(), dist.get_world_size(), device


def barrier(device):
    """Barrier of the default group followed by a device sync."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
    common.sync(device)


def gather(value):
    """Every rank's ``value`` (any picklable object), as a list."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


# ----------------------------------------------------------------------------- strategies
def global_inputs(args, seqlen, device):
    """The full (B, S, H, D) q, k, v, identical on every rank."""
    return make_qkv(args.family, args.batch, seqlen, args.heads, args.head_dim, args.amp,
                    common.torch_dtype(args.dtype), device, kv_heads=args.kv_heads, seed=args.seed)


def prepare(name, args, seqlen, rank, world, device, stack):
    """Return (attention callable, local inputs in its layout) for strategy ``name``.

    Global tensors are dropped before returning so that peak memory reflects the
    strategy; contexts the strategy needs (torch_cp) are entered on ``stack``.
    """
    window = {} if args.window is None else {"window_size": (args.window - 1, 0)}
    if name == "onegpu":
        if window:
            import ring_adasplash

            return (functools.partial(ring_adasplash.adasplash_func, alpha=common.ALPHA, causal=True, **window),
                    global_inputs(args, seqlen, device))
        return common.ours_attention, global_inputs(args, seqlen, device)
    if name == "flex1":  # bench_masks.py's windowed FlexAttention (compiled on a GPU, eager on the CPU)
        return prepare_flex_window(args.window, device.type == "cuda", *global_inputs(args, seqlen, device))
    if name == "sdpa1":
        return common.sdpa_flash, [x.transpose(1, 2) for x in global_inputs(args, seqlen, device)]
    if name == "torch_cp":
        return common.sdpa_flash, torch_cp_inputs(args, seqlen, device, world, stack)
    usp = USP.match(name)
    if usp:
        return usp_prepare(int(usp[1]), int(usp[2]), args, seqlen, world, device, window)
    strategy = OURS[name]
    shard = common.resolve(SHARD)
    if shard is None:
        raise ImportError(f"{SHARD} is not available")
    local = [shard(x, strategy.layout, rank, world, dim=1).clone() for x in global_inputs(args, seqlen, device)]
    return functools.partial(strategy.load(), alpha=common.ALPHA, causal=True, **window), local


@functools.lru_cache(maxsize=None)
def usp_groups(ulysses_degree, ring_degree):
    """Process groups of a U x R mesh, built once (every rank creates every group)."""
    from ring_adasplash.parallel import build_usp_groups

    return build_usp_groups(ulysses_degree, ring_degree)


def usp_prepare(ulysses_degree, ring_degree, args, seqlen, world, device, window):
    """Attention and local inputs of the 2D strategy on a U x R mesh (its ring in the ``usp`` layout)."""
    from ring_adasplash.parallel import UspMesh, usp_shard

    usp = STRATEGIES["usp"]
    if ulysses_degree * ring_degree != world:
        raise ValueError(f"usp{ulysses_degree}x{ring_degree} needs {ulysses_degree * ring_degree} ranks, "
                         f"not {world}")
    ulysses_group, ring_group = usp_groups(ulysses_degree, ring_degree)
    mesh = UspMesh.from_groups(ulysses_group, ring_group)
    local = [usp_shard(x, mesh, usp.layout).clone() for x in global_inputs(args, seqlen, device)]
    return functools.partial(usp.load(), alpha=common.ALPHA, causal=True, ulysses_group=ulysses_group,
                             ring_group=ring_group, ring_layout=usp.layout, **window), local


@functools.lru_cache(maxsize=None)
def _mesh(device_type, world):
    """One 1-D DeviceMesh over all ranks, reused across sequence lengths."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def torch_cp_inputs(args, seqlen, device, world, stack):
    """Enter torch's context_parallel on ``stack``; return local (B, H, S/P, D) shards."""
    from torch.distributed.tensor.experimental import context_parallel

    try:  # private module; keep the default if it moved
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method(args.cp_rotate)
    except Exception as exc:
        print(f"torch_cp: default KV rotation ({common.short_error(exc)})", file=sys.stderr)
    mesh = _mesh(device.type, world)
    buffers = [x.transpose(1, 2).contiguous() for x in global_inputs(args, seqlen, device)]
    stack.enter_context(context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2],
                                         no_restore_buffers=set(buffers)))
    local = [b.clone() for b in buffers]
    for b in buffers:  # the sharded buffers still own the full-size storage: free it
        b.untyped_storage().resize_(0)
    return local


# ----------------------------------------------------------------------------- measurement
def median_ms(step, args, device, collective):
    """Median time of ``step`` in ms (CUDA events on GPU), max over ranks if collective."""
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        if collective:
            barrier(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(common.wall_ms(step, device))
    median = statistics.median(times)
    return _max(gather(median)) if collective else median


def measure(name, args, seqlen, rank, world, device):
    """Time every mode of strategy ``name``; return this rank's (un-reduced) result dict.

    A failure (missing API, OOM, ...) is stored under "error"; modes measured before
    it are kept.
    """
    collective = name not in SINGLE
    res = {}
    with contextlib.ExitStack() as stack:
        try:
            attn, tensors = prepare(name, args, seqlen, rank, world, device, stack)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            for mode in args.modes:
                step = common.make_step(attn, mode, tensors)
                res[f"{mode}_ms"] = median_ms(step, args, device, collective)
                if is_ours(name) or name == "onegpu":
                    suffix = "" if mode == "fwd" else f"_{mode}"
                    counters = common.telemetry_call(step, device)
                    res.update({f"{key}{suffix}": value for key, value in counters.items()})
            if device.type == "cuda":
                res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as exc:
            res["error"] = common.short_error(exc)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def reduce_result(name, res, rank):
    """Combine per-rank results into one row (every rank returns the same row).

    Times and peak memory: max over ranks; bytes: mean; block sparsity: from the summed
    tile counts when available; errors: the first rank's.
    """
    if name in SINGLE:
        box = [res if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return dict(box[0], world_size=1)
    per_rank = gather(res)
    row = {"world_size": len(per_rank)}
    for key in dict.fromkeys(k for x in per_rank for k in x if k != "error"):
        values = [x.get(key) for x in per_rank]
        row[key] = _max(values) if key.endswith("_ms") or key == "peak_mem_gib" else _mean(values)
    for suffix in ("", "_fwdbwd"):  # sparsity over all ranks' tiles, not a mean of fractions
        visible = [x.get(f"visible_tiles{suffix}") for x in per_rank]
        nonzero = [x.get(f"nonzero_tiles{suffix}") for x in per_rank]
        if None not in visible + nonzero and sum(visible) > 0:
            row[f"block_sparsity{suffix}"] = 1.0 - sum(nonzero) / sum(visible)
    errors = [f"rank {r}: {x['error']}" for r, x in enumerate(per_rank) if "error" in x]
    if errors:
        row["error"] = errors[0]
    return row


def check_identical_inputs(args, seqlen, device):
    """Warn (rank 0) if ranks did not generate the same global inputs."""
    q = global_inputs(args, seqlen, device)[0]
    sums = gather(float(q.float().sum()))
    if dist.get_rank() == 0 and len(set(sums)) > 1:
        print(f"WARNING: global inputs differ across ranks (q sums {sums})", file=sys.stderr)


def add_derived(rows, args):
    """Efficiency against the one-GPU baseline and bytes relative to a dense ring."""
    base = {(r["strategy"], r["seqlen"]): r for r in rows if r["strategy"] in SINGLE}
    for r in rows:
        ref = base.get((baseline_of(r["strategy"]), r["seqlen"]))
        for mode in args.modes:
            t1, tp = (ref or {}).get(f"{mode}_ms"), r.get(f"{mode}_ms")
            if t1 and tp:
                r[f"eff_{mode}"] = t1 / (r["world_size"] * tp)
        if r.get("bytes_sent") is not None and r.get("dense_ring_bytes"):
            r["sent_vs_dense"] = r["bytes_sent"] / r["dense_ring_bytes"]
        for key in ("bytes_sent", "dense_ring_bytes"):
            if r.get(key) is not None:
                r[key.replace("bytes", "mb")] = r[key] / 2**20


COLUMNS = [("strategy", "strategy"), ("seqlen", "S"), ("world_size", "P"),
           ("fwd_ms", "fwd ms", ".4g"), ("fwdbwd_ms", "fwd+bwd ms", ".4g"),
           ("eff_fwd", "eff fwd", ".2f"), ("eff_fwdbwd", "eff fwd+bwd", ".2f"),
           ("block_sparsity", "block sparsity", ".3f"), ("mb_sent", "MiB sent/rank (fwd)", ".4g"),
           ("dense_ring_mb", "dense ring MiB", ".4g"), ("sent_vs_dense", "sent/dense", ".3f"),
           ("output_sent_vs_dense", "output pass sent/dense", ".3f"),
           ("remote_block_sparsity", "remote block sparsity", ".3f"),
           ("peak_mem_gib", "peak GiB", ".3g"), ("error", "error")]


def main(argv=None):
    """Run every strategy for every sequence length; rank 0 writes the report."""
    args = parse_args(argv)
    rank, world, device = init_distributed(args)
    if world < 2:
        dist.destroy_process_group()
        raise SystemExit("bench_distributed.py reports strong-scaling efficiency against one GPU: launch it on two or "
                         "more ranks (torchrun --nproc_per_node P, P >= 2)")
    header = None
    if rank == 0:
        header = common.print_header(device, {
            "world_size": world, "backend": dist.get_backend(), "family": args.family,
            "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim, "amp": args.amp,
            "alpha": common.ALPHA, "window": args.window or "none (full causal)", "torch_cp rotate": args.cp_rotate,
            "timing": f"median of {args.iters} iters after {args.warmup} warmup"})
    rows = []
    tasks = [(s, name) for s in args.seqlens for name in args.impls]
    for seqlen, name in tqdm(tasks, desc="distributed", disable=rank != 0, file=sys.stderr):
        if name == args.impls[0]:
            check_identical_inputs(args, seqlen, device)
        res = measure(name, args, seqlen, rank, world, device) if rank == 0 or name not in SINGLE else {}
        row = {"strategy": name, "seqlen": seqlen}
        row.update(reduce_result(name, res, rank))
        row.update(heads=args.heads, head_dim=args.head_dim, batch=args.batch, amp=args.amp,
                   family=args.family, dtype=args.dtype, window=args.window)
        rows.append(row)
        if rank == 0:  # each row as soon as it is measured, so a cut-off run still reports
            print({key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()
                   if key.endswith(("_ms", "sparsity", "gib")) or key in ("strategy", "seqlen", "error")},
                  flush=True)
        barrier(device)
    if rank == 0:
        add_derived(rows, args)
        long = [dict(r, mode=m, ms=r.get(f"{m}_ms")) for r in rows for m in args.modes]

        def plot(path):
            common.plot_panels(long, path, "seqlen", "ms", panel_of=lambda r: r["mode"],
                               line_of=lambda r: r["strategy"], xlabel="global sequence length",
                               ylabel="median time (ms)", title=f"P = {world}, {common.device_name(device)}")

        common.write_report(args.out, f"distributed_{common.timestamp()}", header,
                            common.markdown_table(rows, COLUMNS), rows, plot)
    shutdown()  # destroys the process group; see ring_adasplash.comm.shutdown


if __name__ == "__main__":
    main()
