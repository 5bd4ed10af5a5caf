"""Analytic model of per-layer causal entmax attention time under sequence parallelism.

    python benchmarks/comm_model.py                       # default sweep, tables + PNG
    python benchmarks/comm_model.py --fit results.csv     # calibrate on measured rows

Strategies (P GPUs, 8 per node, NVLink inside a node, InfiniBand across nodes; a ring or
all-to-all spanning more than one node runs at the IB rate):
  ring     contiguous shards. P pipelined steps; the transfer of the next K,V block
           (2 * B * S/P * H * D * bytes) overlaps the compute of the current block, so a step
           costs max(compute, comm). Causal imbalance: the last rank computes a full
           (S/P)^2 block at every step while rank 0 idles (critical path = 2x the balanced one).
  zigzag   ring with 2P chunks (rank r holds r and 2P-1-r): every rank does half a block per step.
  ulysses  all-to-all of q, k, v, o (4 * B * S/P * H * D * bytes * (P-1)/P per GPU, not
           overlapped), then full-sequence attention on H/P heads; needs H % P == 0.
  2d       Ulysses inside a node (degree u = largest divisor of H that is <= min(8, P)),
           zigzag ring over the P/u groups with H/u heads and S/(P/u) tokens per group.
Entmax forward = a statistics pass (threshold search, K only travels) + the main pass
(K and V travel). The statistics pass costs --stats-frac of a dense block and is dense
(no skipping) unless --stats-sparse. Backward: 2.5x the main-pass compute, and dK, dV
travel with K, V (2x the bytes). Compute of nonzero work: (1 - block sparsity); with
zero-block skipping, ring transfers are multiplied by (1 - remote block sparsity).
Flops follow common.attention_flops (4 * B * H * D per query-key pair of nonzero tiles).
Memory: tokens per GPU whose attention fits in --memory-gib (``tokens_that_fit``), with the
per-tile state of every key block (today) or of one key block (streamed).
"""

import argparse
import csv
import math
import os
import sys
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BWD_COMPUTE = 2.5  # backward flops / forward flops
BWD_COMM = 2.0  # backward ring bytes / forward ring bytes (dK, dV travel with K, V)
SCAN_SEQLENS = [2**e for e in range(10, 25)]  # 1K .. 16M, for the "comm hidden from S" frontier


@dataclass(frozen=True)
class Hardware:
    """Link bandwidths per GPU (bytes/s), attention throughput (flop/s) and topology."""
    nvlink: float
    ib: float
    flops: float
    gpus_per_node: int = 8
    latency: float = 0.0  # seconds per message

    def link(self, span):
        """(bytes/s, name) of the slowest link of a group of ``span`` consecutive GPUs."""
        return (self.nvlink, "NVLink") if span <= self.gpus_per_node else (self.ib, "IB")


@dataclass(frozen=True)
class Problem:
    """One attention layer."""
    seqlen: int
    heads: int
    head_dim: int
    batch: int = 1
    elem_bytes: int = 2
    sparsity: float = 0.0  # fraction of causal tiles that are all zero
    remote_sparsity: float = 0.0  # fraction of remote K,V blocks that need not travel
    stats_frac: float = 0.5
    stats_sparse: bool = False

    def block_flops(self, q_tokens, k_tokens, heads):
        """Dense flops of one q_tokens x k_tokens block (4 * B * H * D per pair)."""
        return 4.0 * self.batch * heads * self.head_dim * q_tokens * k_tokens


@dataclass
class Cost:
    """Predicted seconds of one layer: totals, pure compute, and exposed comm per link."""
    fwd: float
    fwdbwd: float
    compute_fwd: float  # forward compute on the critical path
    compute: float  # fwd+bwd compute on the critical path
    exposed: dict  # link name -> fwd+bwd seconds of communication not hidden by compute

    def dominant(self):
        """'compute' or the link whose exposed communication is the largest component."""
        parts = {"compute": self.compute, **self.exposed}
        return max(parts, key=parts.get)

    def exposed_share(self):
        """Fraction of the fwd+bwd time spent waiting for communication."""
        return sum(self.exposed.values()) / self.fwdbwd if self.fwdbwd else 0.0


def pipelined(steps, first, step, comm, latency):
    """Time of ``steps`` ring steps where each transfer overlaps the previous compute."""
    if steps == 1:
        return first
    comm += latency
    return max(first, comm) + (steps - 2) * max(step, comm) + step


def ring_cost(hw, pb, ranks, heads, balanced, skip, link):
    """Cost of a ring over ``ranks`` shards of ``heads`` heads, transfers at ``link`` (bytes/s, name)."""
    chunk = pb.seqlen / ranks
    full = pb.block_flops(chunk, chunk, heads) / hw.flops  # dense off-diagonal block, seconds
    per_step = 0.5 if balanced else 1.0  # critical-path share of a full block per step
    keep = 1.0 - pb.sparsity
    stats_keep = keep if pb.stats_sparse else 1.0
    rkeep = (1.0 - pb.remote_sparsity) if skip else 1.0
    kv = 2 * pb.batch * chunk * heads * pb.head_dim * pb.elem_bytes / link[0]
    stats = pipelined(ranks, pb.stats_frac * stats_keep * full / 2, pb.stats_frac * stats_keep * full * per_step,
                      kv / 2 * (rkeep if pb.stats_sparse else 1.0), hw.latency)
    main = pipelined(ranks, keep * full / 2, keep * full * per_step, kv * rkeep, hw.latency)
    bwd = pipelined(ranks, BWD_COMPUTE * keep * full / 2, BWD_COMPUTE * keep * full * per_step,
                    BWD_COMM * kv * rkeep, hw.latency)
    steps = 0.5 + (ranks - 1) * per_step  # diagonal block + off-diagonal steps
    compute_fwd = (pb.stats_frac * stats_keep + keep) * full * steps
    compute = compute_fwd + BWD_COMPUTE * keep * full * steps
    fwd = stats + main
    return Cost(fwd, fwd + bwd, compute_fwd, compute, {link[1]: fwd + bwd - compute})


def ulysses_a2a(hw, pb, degree):
    """Seconds of one all-to-all of 4 tensors (q, k, v, o or their gradients)."""
    bw, _ = hw.link(degree)
    volume = 4 * pb.batch * pb.seqlen / degree * pb.heads * pb.head_dim * pb.elem_bytes
    return volume * (degree - 1) / degree / bw + 4 * hw.latency


def model(strategy, hw, pb, gpus, skip=False):
    """Predicted Cost of ``strategy`` on ``gpus`` GPUs, or None when infeasible."""
    if strategy in ("ring", "zigzag"):
        return ring_cost(hw, pb, gpus, pb.heads, strategy == "zigzag", skip, hw.link(gpus))
    if strategy == "ulysses":
        if pb.heads % gpus:
            return None
        local = ring_cost(hw, pb, 1, pb.heads / gpus, True, skip, hw.link(1))
        a2a = ulysses_a2a(hw, pb, gpus)
        _, name = hw.link(gpus)
        return Cost(local.fwd + a2a, local.fwdbwd + 2 * a2a, local.compute_fwd, local.compute, {name: 2 * a2a})
    if strategy == "2d":
        inner = max(d for d in range(1, min(hw.gpus_per_node, gpus) + 1)
                    if pb.heads % d == 0 and gpus % d == 0)
        ring = ring_cost(hw, pb, gpus // inner, pb.heads / inner, True, skip, hw.link(gpus))
        a2a = ulysses_a2a(hw, pb, inner) if inner > 1 else 0.0
        exposed = dict(ring.exposed)
        exposed["NVLink"] = exposed.get("NVLink", 0.0) + 2 * a2a
        return Cost(ring.fwd + a2a, ring.fwdbwd + 2 * a2a, ring.compute_fwd, ring.compute, exposed)
    raise ValueError(f"unknown strategy {strategy}")


def variants(pb):
    """(label, strategy, skip) columns; '+skip' only when remote blocks can be skipped."""
    out = []
    for strategy in ("ring", "zigzag", "ulysses", "2d"):
        out.append((strategy, strategy, False))
        if strategy != "ulysses" and pb.remote_sparsity > 0:
            out.append((strategy + "+skip", strategy, True))
    return out


# ----------------------------------------------------------------------------- reports
TAGS = {"compute": "C", "NVLink": "N", "IB": "I"}


def sweep(hw, args):
    """Predictions for every (sparsity, seqlen, P, variant) as a list of dicts."""
    rows = []
    for sparsity in args.block_sparsity:
        remote = sparsity if args.remote_block_sparsity is None else args.remote_block_sparsity
        for seqlen in args.seqlens:
            pb = problem(args, seqlen, sparsity, remote)
            setting = f"sparsity={sparsity:g} remote={remote:g}"
            ideal = ring_cost(hw, pb, 1, pb.heads, True, False, hw.link(1))  # one GPU, split P ways
            for gpus in args.gpus:
                rows.append(dict(setting=setting, seqlen=seqlen, P=gpus, variant="ideal",
                                 fwd_ms=ideal.fwd / gpus * 1e3, fwdbwd_ms=ideal.fwdbwd / gpus * 1e3,
                                 dominant="compute"))
                for label, strategy, skip in variants(pb):
                    cost = model(strategy, hw, pb, gpus, skip)
                    row = dict(setting=setting, seqlen=seqlen, P=gpus, variant=label)
                    if cost is None:
                        row["dominant"] = "infeasible"
                    else:
                        row.update(fwd_ms=cost.fwd * 1e3, fwdbwd_ms=cost.fwdbwd * 1e3,
                                   compute_ms=cost.compute * 1e3, exposed_share=cost.exposed_share(),
                                   dominant=cost.dominant())
                    rows.append(row)
    return rows


def problem(args, seqlen, sparsity, remote):
    """Problem built from the command line options."""
    return Problem(seqlen, args.heads, args.head_dim, args.batch, args.elem_bytes, sparsity, remote,
                   args.stats_frac, args.stats_sparse)


def time_tables(rows, args):
    """One markdown table per (setting, seqlen): rows P, columns variants, cells 'ms [tag]'."""
    key = f"{args.mode}_ms"
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for seqlen in args.seqlens:
            sub = [r for r in rows if r["setting"] == setting and r["seqlen"] == seqlen]
            labels = list(dict.fromkeys(r["variant"] for r in sub))
            table = []
            for gpus in args.gpus:
                cells = {"P": gpus}
                for r in sub:
                    if r["P"] == gpus:
                        cells[r["variant"]] = ("infeasible" if r["dominant"] == "infeasible"
                                               else f"{r[key]:.3g} [{TAGS[r['dominant']]}]")
                table.append(cells)
            out.append(f"### {args.mode} ms, S={seqlen}, {setting}\n\n"
                       + common.markdown_table(table, [("P", "P")] + [(v, v) for v in labels]))
    return out


def frontier_tables(hw, args):
    """Per (setting, P, variant): smallest S (power of 2) whose exposed comm share is below
    --hidden-threshold, i.e. communication hides behind compute from that length on."""
    out = []
    for sparsity in args.block_sparsity:
        remote = sparsity if args.remote_block_sparsity is None else args.remote_block_sparsity
        pb0 = problem(args, SCAN_SEQLENS[0], sparsity, remote)
        table = []
        for gpus in args.gpus:
            cells = {"P": gpus}
            for label, strategy, skip in variants(pb0):
                found = "never"
                for seqlen in SCAN_SEQLENS:
                    cost = model(strategy, hw, replace(pb0, seqlen=seqlen), gpus, skip)
                    if cost is None:
                        found = "infeasible"
                        break
                    if cost.exposed_share() <= args.hidden_threshold:
                        found = human(seqlen)
                        break
                cells[label] = found
            table.append(cells)
        cols = [("P", "P")] + [(label, label) for label, _, _ in variants(pb0)]
        out.append(f"### comm hidden (exposed <= {args.hidden_threshold:.0%} of fwd+bwd) from S >=, "
                   f"sparsity={sparsity:g} remote={remote:g} (scan 1K..16M)\n\n"
                   + common.markdown_table(table, cols))
    return out


# ----------------------------------------------------------------------------- memory
TILE = 64  # query and key tile of the block mask
# bytes per (token, head, head-dim element) that grow with the local sequence alone: q, k, v, out,
# grad out, dq, dk, dv in the input dtype, two K,V blocks in flight in a ring (4 more), and the
# float32 out, sum u v and dq sums
LINEAR_ELEMS, LINEAR_FP32 = 12, 3


def tokens_that_fit(args, gpus, streamed):
    """Largest local sequence whose attention memory fits in --memory-gib: linear bytes plus
    --tile-bytes per (local query tile, key tile, head) over every key block of the sequence
    (today), or over one local-sized key block (streamed, a ring step keeping its own block's
    maps); the root of a quadratic in S_local."""
    per_token = (LINEAR_ELEMS * args.elem_bytes + LINEAR_FP32 * 4) * args.batch * args.heads * args.head_dim
    per_token2 = args.tile_bytes * args.batch * args.heads / TILE**2 * (1 if streamed else gpus)
    budget = args.memory_gib * 2**30
    return int((-per_token + math.sqrt(per_token**2 + 4 * per_token2 * budget)) / (2 * per_token2))


def memory_tables(args):
    """Per P: tokens per GPU (and in all) whose attention fits in --memory-gib, with per-tile state
    kept for every key block (as today) and streamed one key block at a time."""
    table = []
    for gpus in args.gpus:
        today, streamed = tokens_that_fit(args, gpus, False), tokens_that_fit(args, gpus, True)
        table.append({"P": gpus, "today": human_tokens(today), "today_total": human_tokens(today * gpus),
                      "streamed": human_tokens(streamed), "streamed_total": human_tokens(streamed * gpus)})
    cols = [("P", "P"), ("today", "tokens per GPU, state of every key block"), ("today_total", "in all"),
            ("streamed", "tokens per GPU, state of one key block"), ("streamed_total", "in all")]
    return [f"### tokens that fit: attention memory <= {args.memory_gib:g} GiB per GPU, {args.tile_bytes:g} bytes "
            f"per (query tile, key tile, head), B={args.batch} H={args.heads} D={args.head_dim}\n\n"
            + common.markdown_table(table, cols)]


def human_tokens(tokens):
    """Tokens rounded down to a power of two, as '512K' or '2M'."""
    return human(2 ** int(math.log2(max(tokens, 1024))))


def human(seqlen):
    """1024 -> '1K', 1048576 -> '1M'."""
    return f"{seqlen // 2**20}M" if seqlen >= 2**20 else f"{seqlen // 2**10}K"


# ----------------------------------------------------------------------------- fitting
FIT_STRATEGIES = {"onegpu": "ring", "ring": "ring", "zigzag": "zigzag", "ulysses": "ulysses"}


def _number(row, key):
    try:
        value = float(row.get(key) or "nan")
    except ValueError:
        return None
    return None if math.isnan(value) else value


def fit(hw, args):
    """Fit the tile rate on compute-bound measured points; print model vs measured."""
    with open(args.fit, newline="") as handle:
        measured = [r for r in csv.DictReader(handle) if r.get("strategy") in FIT_STRATEGIES]
    points = []  # (row, mode, measured seconds, Problem, P, skip)
    for r in measured:
        gpus = int(float(r["world_size"]))
        sparsity = _number(r, "block_sparsity")
        sparsity = args.block_sparsity[-1] if sparsity is None else sparsity
        sent, dense = _number(r, "bytes_sent"), _number(r, "dense_ring_bytes")
        remote = 1 - sent / dense if sent is not None and dense else (args.remote_block_sparsity or 0.0)
        pb = Problem(int(float(r["seqlen"])), int(_number(r, "heads") or args.heads),
                     int(_number(r, "head_dim") or args.head_dim), int(_number(r, "batch") or args.batch),
                     args.elem_bytes, sparsity, remote, args.stats_frac, args.stats_sparse)
        for mode in ("fwd", "fwdbwd"):
            t = _number(r, f"{mode}_ms")
            if t:
                points.append((r, mode, t * 1e-3, pb, gpus, sent is not None))
    if not points:
        sys.exit(f"--fit: no usable rows (strategies {sorted(FIT_STRATEGIES)}) in {args.fit}")

    def predict(rate, p):
        """(Cost, predicted seconds, compute-only seconds) of point ``p`` at tile rate ``rate``."""
        cost = model(FIT_STRATEGIES[p[0]["strategy"]], replace(hw, flops=rate), p[3], p[4], p[5])
        if p[1] == "fwd":
            return cost, cost.fwd, cost.compute_fwd
        return cost, cost.fwdbwd, cost.compute

    rate = hw.flops
    for _ in range(10):  # classify with the current rate, refit on the compute-bound points
        bound = [p for p in points if predict(rate, p)[0].exposed_share() <= args.hidden_threshold]
        if not bound:
            print("--fit: no compute-bound point; keeping --tile-tflops")
            break
        work = [predict(rate, p)[2] * rate for p in bound]  # flops: compute time = work / rate
        inv = sum(w * p[2] for w, p in zip(work, bound)) / sum(w * w for w in work)
        rate = 1.0 / inv
    print(f"fitted tile rate: {rate / 1e12:.4g} TFLOP/s (from {len(bound)} compute-bound points; "
          f"start {hw.flops / 1e12:.0f})\n")
    table = []
    for p in points:
        cost, t, _ = predict(rate, p)
        table.append(dict(strategy=p[0]["strategy"], S=p[3].seqlen, P=p[4], mode=p[1], sparsity=p[3].sparsity,
                          remote=p[3].remote_sparsity, measured=p[2] * 1e3, model=t * 1e3,
                          ratio=t / p[2], bound=cost.dominant()))
    print(common.markdown_table(table, [
        ("strategy", "strategy"), ("S", "S"), ("P", "P"), ("mode", "mode"), ("sparsity", "sparsity", ".3f"),
        ("remote", "remote sparsity", ".3f"), ("measured", "measured ms", ".4g"),
        ("model", "model ms", ".4g"), ("ratio", "model/measured", ".2f"), ("bound", "bound by")]))


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per GPU")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU")
    p.add_argument("--tile-tflops", type=float, default=400.0, help="effective attention TFLOP/s")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink inside, InfiniBand across)")
    p.add_argument("--latency-us", type=float, default=0.0, help="per-message latency")
    p.add_argument("--gpus", type=common.csv_list(int), default=[2**e for e in range(1, 11)],
                   help="GPU counts to model, comma-separated")
    p.add_argument("--seqlens", type=common.csv_list(int), default=[131072, 1048576],
                   help="sequence lengths, comma-separated")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--elem-bytes", type=int, default=2, help="bytes per element (bf16 = 2)")
    p.add_argument("--block-sparsity", type=common.csv_list(float), default=[0.0, 0.9],
                   help="block sparsities to model, comma-separated")
    p.add_argument("--remote-block-sparsity", type=float, default=None,
                   help="fraction of remote K,V blocks skipped (default: = block sparsity)")
    p.add_argument("--stats-frac", type=float, default=0.5,
                   help="statistics pass cost per block, relative to a dense forward block")
    p.add_argument("--stats-sparse", action="store_true", help="statistics pass also skips zero blocks")
    p.add_argument("--hidden-threshold", type=float, default=0.1,
                   help="comm counts as hidden while exposed comm <= this share of fwd+bwd")
    p.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd", help="time shown in the tables")
    p.add_argument("--memory-gib", type=float, default=64.0,
                   help="GPU memory attention may use (GiB), for the tokens-that-fit table")
    p.add_argument("--tile-bytes", type=float, default=5.75,
                   help="bytes of per-tile state per (query tile, key tile, head) (benchmarks/tile_state.py "
                        "measures them: 5.75 held in a forward with the Triton kernels, tile lists included; 3.25 "
                        "on the PyTorch backend, which lists no tiles)")
    p.add_argument("--fit", default=None, help="CSV of measured rows (bench_distributed.py output)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv, .png)")
    return p.parse_args(argv)


def main(argv=None):
    """Print the prediction tables (or the fit) and write md/csv/png."""
    args = parse_args(argv)
    hw = Hardware(args.nvlink_gbs * 1e9, args.ib_gbs * 1e9, args.tile_tflops * 1e12,
                  args.gpus_per_node, args.latency_us * 1e-6)
    if args.fit:
        fit(hw, args)
        return
    header = "\n".join(f"- {k}: {v}" for k, v in vars(args).items())
    print(header)
    rows = sweep(hw, args)
    text = "\n\n".join(time_tables(rows, args) + frontier_tables(hw, args) + memory_tables(args))
    text += "\n\n[C] compute-bound, [N] NVLink-bound, [I] IB-bound (largest of compute and exposed comm)"

    def plot(path):
        common.plot_panels(rows, path, "P", f"{args.mode}_ms",
                           panel_of=lambda r: f"S={r['seqlen']} {r['setting']}", line_of=lambda r: r["variant"],
                           xlabel="GPUs", ylabel=f"predicted {args.mode} ms per layer",
                           title=f"H={args.heads} D={args.head_dim}, {args.tile_tflops:g} TFLOP/s, "
                                 f"NVLink {args.nvlink_gbs:g} GB/s, IB {args.ib_gbs:g} GB/s")

    common.write_report(args.out, f"comm_model_{common.timestamp()}", header, text, rows, plot)


if __name__ == "__main__":
    main()
