"""Shared helpers for the ring-adasplash benchmark scripts.

Only the standard library is imported at module level, so that the analytic
model (``comm_model.py``) can use these helpers without torch installed.
"""

import csv
import datetime
import importlib
import importlib.metadata
import math
import os
import shlex
import sys

from inputs import FAMILIES  # benchmarks/ is on the path of every script that imports this

ALPHA = 1.5  # entmax alpha used by every benchmark
TILE = 64  # block-mask tile size (rows and columns) used for the flop counts
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ----------------------------------------------------------------------------- CLI parsing
def add_input_arguments(p):
    """The options every distributed script shares: problem shape, input family and dtype."""
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--amp", type=float, default=1.5, help="amplitude of the positional code (higher: sparser)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="structured",
                   help="input family of inputs.py: structured (local, amp sets the sparsity), sinkwindow, "
                        "scattered (content clusters, no locality) or mixed (half the heads of each)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="input dtype")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda, or cpu for a smoke test")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--timeout-min", type=float, default=30.0, help="process-group timeout in minutes")


def add_case_arguments(p):
    """One single-GPU case of the structured inputs (``first_call.py``, ``profile_forward.py``)."""
    p.add_argument("--seqlen", type=int, default=32768, help="global sequence length (tokens)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--amp", type=float, default=1.5, help="amplitude of the positional code (higher: sparser)")


def init_ranks():
    """Joins the torchrun group (NCCL with a GPU per rank, else gloo on CPU, one thread per rank);
    returns ``(rank, world, device)``."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    return rank, world, device


def csv_list(kind):
    """Return an argparse ``type`` that parses ``"a,b,c"`` into a list of ``kind``."""

    def parse(text):
        return [kind(item) for item in text.split(",") if item.strip()]

    return parse


def torch_dtype(name):
    """Map a short dtype name (bf16, fp16, fp32) to the torch dtype."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def timestamp():
    """Timestamp used in output file names, e.g. 20250101-120000."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------- environment
def package_version(name):
    """Installed version of a distribution, or a short reason why there is none."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        try:
            module = importlib.import_module(name.replace("-", "_"))
        except Exception:
            return "not installed"
        return getattr(module, "__version__", "importable (no version)")


def device_name(device):
    """Human readable name of the accelerator behind ``device`` (or 'cpu')."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
        return "cuda requested but not available"
    return "cpu"


def header_lines(device, extra=None):
    """Environment header: date, device, library versions and the command line."""
    lines = [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"device: {device_name(device)}",
        f"python: {sys.version.split()[0]}",
    ]
    for pkg in ("torch", "triton", "adasplash", "ring-adasplash"):
        lines.append(f"{pkg}: {package_version(pkg)}")
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    launcher = "torchrun " if "TORCHELASTIC_RUN_ID" in os.environ else f"{sys.executable} "
    lines.append("command: " + launcher + shlex.join(sys.argv))
    return lines


def print_header(device, extra=None, stream=None):
    """Print the environment header; return it as markdown bullet text."""
    lines = header_lines(device, extra)
    text = "\n".join(f"- {line}" for line in lines)
    print(text, file=stream or sys.stdout, flush=True)
    return text


def short_error(exc, limit=160):
    """One-line description of an exception, suitable for a table cell."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- flop counts
def causal_tiles(seqlen, tile=TILE):
    """Number of TILE x TILE tiles on or below the diagonal of a causal S x S score matrix."""
    nb = math.ceil(seqlen / tile)
    return nb * (nb + 1) // 2


def attention_flops(batch, heads, head_dim, seqlen, block_sparsity=0.0, mode="fwd"):
    """Flops of causal attention restricted to nonzero tiles.

    fwd:    4 * B * H * D * nnz_tiles * TILE * TILE  (QK^T and PV, 2 flops per MAC)
    fwdbwd: 3.5x fwd (the backward recomputes QK^T and does dV, dP, dQ, dK: 5 matmuls)
    with nnz_tiles = (1 - block_sparsity) * causal_tiles(S), i.e. block_sparsity is the
    fraction of causal tiles whose probabilities are all zero (0 for dense kernels).
    """
    nnz = (1.0 - block_sparsity) * causal_tiles(seqlen)
    fwd = 4.0 * batch * heads * head_dim * nnz * TILE * TILE
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


# ----------------------------------------------------------------------------- torch helpers
def sync(device):
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def wall_ms(fn, device):
    """Wall-clock time of one synchronized call of ``fn``, in ms."""
    import time

    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def host_ms(step, calls: int) -> float:
    """Ms per call that the host takes to issue ``calls`` calls of ``step`` (a CUDA step) after
    three warm-up calls, from an idle device, with no wait at the end: where it exceeds the device
    ms, the host's own work (or a wait inside a call) bounds the call, not the kernels."""
    import time

    import torch

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / calls * 1e3


def device_ms_by_kernel(step, calls: int = 5):
    """Device ms per call of ``step`` (a CUDA step), in all and as a ``collections.Counter`` by
    kernel name, from ``torch.profiler`` over ``calls`` calls after three warm-up calls."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    by_kernel = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[event.name] += event.device_time_total / 1000 / calls
    return sum(by_kernel.values()), by_kernel


def make_step(attn, mode, tensors):
    """Zero-argument callable running one ``mode`` ('fwd' or 'fwdbwd') step of ``attn``.

    ``tensors`` (q, k, v, already in ``attn``'s layout) are detached into fresh leaves.
    fwd runs under no_grad; fwdbwd returns the input gradients via autograd.grad (no
    accumulation into .grad between repetitions).
    """
    import torch

    leaves = [x.detach().requires_grad_(mode == "fwdbwd") for x in tensors]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return attn(*leaves)
        return step
    grad_out = torch.randn_like(leaves[0])

    def step():
        out = attn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)
    return step


HEAD_ALPHAS = None  # None: alpha = ALPHA, a float; else one alpha per query head, learnable (bench_kernels --head-alphas)
ALPHA_STEP = 0.0  # with HEAD_ALPHAS: each call first moves them by this, up and down (bench_kernels --alpha-step)
DEVICE_ALPHA = False  # with HEAD_ALPHAS: given as ring_adasplash.DeviceAlpha, not read on the host (--device-alpha)
_alpha_parameters: dict = {}


def ours_attention(q, k, v):
    """Our single-GPU entry point (causal, alpha = ALPHA, or HEAD_ALPHAS as a learnable per-head
    tensor, made once per device like a model's parameter, moved by ALPHA_STEP before each call);
    layout (B, S, H, D)."""
    import ring_adasplash
    import torch

    if HEAD_ALPHAS is None:
        return ring_adasplash.adasplash_func(q, k, v, alpha=ALPHA, causal=True)
    key = (q.device, tuple(HEAD_ALPHAS))
    if key not in _alpha_parameters:
        moved = [0.0 if a in (1.5, 2.0) else 1.0 for a in HEAD_ALPHAS]  # the closed forms' heads stay
        _alpha_parameters[key] = (torch.tensor(HEAD_ALPHAS, device=q.device, requires_grad=True),
                                  torch.tensor(moved, device=q.device), [ALPHA_STEP])
    alpha, moved, step = _alpha_parameters[key]
    if step[0]:
        with torch.no_grad():  # as an optimizer step: in place, on the device
            alpha.add_(moved, alpha=step[0])
        step[0] = -step[0]
    return ring_adasplash.adasplash_func(q, k, v, alpha=ring_adasplash.DeviceAlpha(alpha) if DEVICE_ALPHA else alpha,
                                         causal=True)


def add_alpha_arguments(p):
    """``--alpha``, ``--head-alphas`` and ``--device-alpha`` (``check_alpha_arguments`` after parsing)."""
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help="entmax alpha of ours and AdaSplash (AdaSplash takes its AdaSplash-1 path unless 1.5)")
    p.add_argument("--head-alphas", default="none",
                   help="ours only: none (alpha a float), same (a learnable per-head tensor of --alpha), "
                        "or LO:HI (a learnable per-head tensor, evenly spaced)")
    p.add_argument("--device-alpha", action="store_true",
                   help="with --head-alphas: the tensor given as ring_adasplash.DeviceAlpha (its values not read "
                        "on the host; every head in the general form's schedule)")


def check_alpha_arguments(p, args):
    """The parser's error where ``add_alpha_arguments``' options do not go together."""
    if args.device_alpha and args.head_alphas == "none":
        p.error("--device-alpha needs --head-alphas (same or LO:HI)")
    return args


def head_alphas(spec: str, alpha: float, heads: int):
    """``--head-alphas``: "none" (None), "same" (``alpha`` on every head) or "LO:HI" (evenly
    spaced over the heads)."""
    if spec == "none":
        return None
    if spec == "same":
        return [alpha] * heads
    lo, hi = (float(x) for x in spec.split(":"))
    return [lo + (hi - lo) * h / max(1, heads - 1) for h in range(heads)]


def with_env(step, name: str, value: str):
    """``step`` run with the environment variable ``name`` at ``value`` (as it was before, after)."""

    def run():
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return step()
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous

    return run


def without_cuda_graphs(step):
    """``step`` with ring-adasplash's CUDA graphs off (ring_adasplash/cuda_graphs.py) for the whole
    step, backward included: every kernel launched from Python on every call."""
    from ring_adasplash import cuda_graphs

    return with_env(step, cuda_graphs.MODE_ENV, "off")


TELEMETRY = "ring_adasplash.telemetry:record"  # context manager yielding our counters


def telemetry_call(step, device):
    """Run ``step`` once inside our telemetry recorder; return a dict of its counters.

    Keys: block_sparsity, bytes_sent, dense_ring_bytes, visible_tiles, nonzero_tiles;
    None for anything the recorder does not provide (block sparsity is None when no
    tile was counted).
    """
    keys = ("block_sparsity", "bytes_sent", "dense_ring_bytes", "visible_tiles", "nonzero_tiles")
    record = resolve(TELEMETRY)
    if record is None:
        step()
        return dict.fromkeys(keys)
    with record() as rec:
        step()
        sync(device)
    out = {key: None if getattr(rec, key, None) is None else float(getattr(rec, key)) for key in keys}
    if out["visible_tiles"] == 0:
        out["block_sparsity"] = None
    sent, dense = getattr(rec, "bytes_by_pass", {}).get("output", (0, 0))
    out["output_sent_vs_dense"] = sent / dense if dense else None
    remote = getattr(rec, "remote_visible_tiles", 0)
    out["remote_block_sparsity"] = rec.remote_block_sparsity if remote else None
    return out


def sdpa_flash(q, k, v):
    """Causal torch SDPA restricted to the flash backend; layout (B, H, S, D).

    ``scaled_dot_product_attention`` is looked up at call time so that PyTorch's
    context-parallel patch (which replaces it) is honoured.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)


# ----------------------------------------------------------------------------- output
def fmt(value, spec=".3g"):
    """Format a table cell: None/NaN -> '-', floats with ``spec``, anything else str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(rows, columns):
    """Render ``rows`` (list of dicts) as a markdown table.

    ``columns`` is a list of (key, title) or (key, title, format spec) tuples.
    """
    cols = [c if len(c) == 3 else (c[0], c[1], ".3g") for c in columns]
    out = ["| " + " | ".join(title for _, title, _ in cols) + " |"]
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        out.append("| " + " | ".join(fmt(row.get(key), spec) for key, _, spec in cols) + " |")
    return "\n".join(out)


def write_csv(rows, path):
    """Write a list of dicts to ``path`` (columns = union of keys, in first-seen order)."""
    fields = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_report(out_dir, stem, header, table, rows, plot_fn=None, echo=True):
    """Print ``table`` and write <stem>.md, <stem>.csv and (via ``plot_fn``) <stem>.png;
    ``echo`` False: write them without printing (a report rewritten as a run goes on).

    Returns the list of written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    if echo:
        print("\n" + table, flush=True)
    with open(base + ".md", "w") as handle:
        handle.write(header + "\n\n" + table + "\n")
    write_csv(rows, base + ".csv")
    paths = [base + ".md", base + ".csv"]
    if plot_fn is not None:
        try:
            plot_fn(base + ".png")
            paths.append(base + ".png")
        except Exception as exc:  # a plot must never lose the measurements
            print(f"plot failed: {short_error(exc)}", file=sys.stderr)
    if echo:
        print("wrote " + ", ".join(paths), flush=True)
    return paths


def plot_panels(rows, path, x, y, panel_of, line_of, xlabel, ylabel, title=""):
    """Log-log line plot: one subplot per ``panel_of(row)``, one line per ``line_of(row)``.

    Rows whose ``y`` is missing or NaN are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if isinstance(r.get(y), (int, float)) and not math.isnan(r[y])]
    panels = sorted({panel_of(r) for r in good}, key=str)
    if not panels:
        raise ValueError("nothing to plot")
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.5 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        lines = {}
        for r in good:
            if panel_of(r) == panel:
                lines.setdefault(line_of(r), []).append((r[x], r[y]))
        for label, pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(str(panel), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve(dotted):
    """Return the object named ``"package.module:attr"``, or None if it cannot be imported."""
    module_name, _, attr = dotted.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
        return obj
    except Exception:  # missing package, missing attribute, or a broken import
        return None
