"""entmax over a tensor on one GPU: ring_adasplash.entmax vs the entmax package vs AdaSplash's
triton_entmax, forward and forward + backward, with the error of each against the entmax package
in float64.

    python benchmarks/bench_entmax.py --shapes 16384x1024,4096x8192,256x65536 --alphas 1.5,2.0,1.25

Rows are N(0, scale^2) scores (``--scale``: 1 gives rows of a few dozen nonzeros at 8K wide,
0.05 nearly flat rows, attention at initialisation), entmax along the last dim, in ``--dtype``.
Impls: ``ours`` (``ring_adasplash.entmax``: the Triton row kernel forward, PyTorch backward),
``entmax`` (``entmax15``, ``sparsemax`` or ``entmax_bisect`` of the entmax package, PyTorch),
``adasplash`` (``adasplash.triton_entmax``, AdaSplash 0.2.2's default settings; forward only).
Times are medians of ``triton.testing.do_bench``; ``max err`` is the largest absolute difference
of p from the entmax package's in float64 (``entmax_bisect`` with 200 iterations off 1.5 and 2).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _shape(text):
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def entmax_package(x, alpha, n_iter=50):
    """The entmax package: ``entmax15``, ``sparsemax``, or ``entmax_bisect`` with ``n_iter``
    bisection steps off 1.5 and 2."""
    import entmax

    if alpha == 1.5:
        return entmax.entmax15(x, dim=-1)
    if alpha == 2.0:
        return entmax.sparsemax(x, dim=-1)
    return entmax.entmax_bisect(x, alpha=alpha, dim=-1, n_iter=n_iter)


def reference(x, alpha):
    """The entmax package in float64 (200 bisection steps off 1.5 and 2)."""
    return entmax_package(x.double(), alpha, n_iter=200)


def impls(alpha):
    """name -> (function of x, whether it has a backward)."""
    import ring_adasplash

    def adasplash_entmax(x):
        import adasplash

        return adasplash.triton_entmax(x, alpha=alpha)

    return {"ours": (lambda x: ring_adasplash.entmax(x, alpha), True),
            "entmax": (lambda x: entmax_package(x, alpha), True), "adasplash": (adasplash_entmax, False)}


def measure(fn, x, mode, args):
    """Median ms of one ``mode`` step: ``do_bench`` on the GPU, the wall clock (median of 3) on CPU."""
    import statistics

    from triton.testing import do_bench

    leaf = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(x)
        return torch.autograd.grad(fn(leaf), leaf, grad)

    if args.device == "cpu":
        return statistics.median(common.wall_ms(step, "cpu") for _ in range(3))
    return do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=common.csv_list(_shape), default=[(16384, 1024), (4096, 8192), (256, 65536)],
                   help="rows x columns, comma-separated")
    p.add_argument("--alphas", type=common.csv_list(float), default=[1.5, 2.0, 1.25], help="entmax alphas")
    p.add_argument("--scale", type=float, default=1.0, help="standard deviation of the scores")
    p.add_argument("--dtype", choices=sorted(common.DTYPE_NAMES), default="fp32", help="input dtype")
    p.add_argument("--impls", type=common.csv_list(str), default=["ours", "entmax", "adasplash"],
                   help="implementations, comma-separated")
    p.add_argument("--modes", type=common.csv_list(str), default=["fwd", "fwdbwd"], help="fwd, fwdbwd")
    p.add_argument("--warmup-ms", type=float, default=50.0, help="warm-up time per measurement (ms)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="measured time per measurement (ms)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda, or cpu for a smoke test (wall clock; the row kernel needs TRITON_INTERPRET=1 "
                        "RING_ADASPLASH_BACKEND=triton there, else the PyTorch path runs)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv)")
    args = p.parse_args()
    header = common.print_header(args.device, {"scale": args.scale, "dtype": args.dtype})
    dtype = common.torch_dtype(args.dtype)
    rows = []
    for (num_rows, num_cols), alpha in ((s, a) for s in args.shapes for a in args.alphas):
        gen = torch.Generator(device=args.device).manual_seed(0)
        x = (args.scale * torch.randn(num_rows, num_cols, generator=gen, device=args.device)).to(dtype)
        want = reference(x, alpha)
        for name, (fn, has_backward) in impls(alpha).items():
            if name not in args.impls:
                continue
            row = {"impl": name, "rows": num_rows, "cols": num_cols, "alpha": alpha}
            try:
                with torch.no_grad():
                    row["max_err"] = (fn(x).double() - want).abs().max().item()
                for mode in args.modes:
                    if mode == "fwd" or has_backward:
                        row[f"{mode}_ms"] = measure(fn, x, mode, args)
            except Exception as exc:  # one failing impl must not lose the others' rows
                row["error"] = common.short_error(exc)
            print("row", row, flush=True)
            rows.append(row)
        del want
    table = common.markdown_table(rows, [("impl", "impl"), ("rows", "rows"), ("cols", "cols"), ("alpha", "alpha"),
                                         ("fwd_ms", "fwd ms"), ("fwdbwd_ms", "fwd+bwd ms"),
                                         ("max_err", "max err", ".2e"), ("error", "error")])
    common.write_report(args.out, f"entmax_{common.timestamp()}", header, table, rows)


if __name__ == "__main__":
    main()
