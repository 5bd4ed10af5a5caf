"""Before and after in one run: ``bench_kernels.py`` on two versions of the package, alternating.

    python benchmarks/ab.py 48d147a tree --rounds 2 -- --rows 32768:128:1.5 --impls ours --modes fwd,fwdbwd
    python benchmarks/ab.py HEAD~1 HEAD -- --family scattered --rows 32768:128:1.0 --impls ours --modes fwdbwd

OLD and NEW are commits (the package taken out of git with ``git archive`` into a temporary
folder), ``tree`` (the working tree's package) or a folder that holds a ``ring_adasplash``
package (a commit taken out of git elsewhere, for a machine whose copy has no git history).
Each round runs OLD then NEW, the next NEW then OLD, and so on (the order alternates, so that a
drift of the GPU's clocks or temperature falls on both), each a ``bench_kernels.py`` process of
its own (the working tree's script, everything after ``--`` passed to it) with ``PYTHONPATH`` at
the package. Prints each run's median ms per row (impl, mode, S, D, amp) as the run ends, then
prints and writes (``--out``) them all and NEW / OLD of their means (the ratio of the means over
each version's runs). The report is written after every run, so a call cut short by a time limit
leaves the runs it finished (its header says how many).
"""
import argparse
import csv
import glob
import os
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

KEY = ("impl", "mode", "seqlen", "head_dim", "amp")


def package(version: str, folder: str) -> tuple[str, str]:
    """``(a PYTHONPATH folder holding ring_adasplash at version, its name)``: ``tree`` is the
    working tree, a folder with a ``ring_adasplash`` package that folder, anything else a commit
    of the working tree's git history."""
    if version == "tree":
        return ROOT, "tree"
    if os.path.isdir(os.path.join(version, "ring_adasplash")):
        return os.path.abspath(version), os.path.basename(os.path.abspath(version))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", version], capture_output=True, text=True)
    if commit.returncode:
        raise SystemExit(f"ab.py: {version!r} is not 'tree', a folder holding ring_adasplash or a commit of {ROOT}: "
                         f"{commit.stderr.strip()}")
    commit = commit.stdout.strip()
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "ring_adasplash"], capture_output=True, check=True)
    os.makedirs(folder)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder, commit


def environment(path: str) -> dict:
    """This process's environment with ``path`` first on PYTHONPATH; raises unless a Python
    started with it imports ring_adasplash from ``path`` (an installed copy could win)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    found = subprocess.run([sys.executable, "-c", "import ring_adasplash; print(ring_adasplash.__file__)"], env=env,
                           cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(os.path.join(path, "ring_adasplash")):
        raise SystemExit(f"ab.py: with PYTHONPATH={path}, ring_adasplash comes from {found}")
    return env


def bench(env: dict, bench_args: list, out: str) -> dict:
    """One ``bench_kernels.py`` process in ``env`` (``environment``): {row key: median ms}."""
    subprocess.run([sys.executable, os.path.join(HERE, "bench_kernels.py"), *bench_args, "--out", out], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    (report,) = glob.glob(os.path.join(out, "kernels_*.csv"))
    with open(report) as f:
        rows = list(csv.DictReader(f))
    return {tuple(row[k] for k in KEY): float(row["ms"]) if row["ms"] else float("nan") for row in rows}


def report_rows(names: list, runs: list) -> tuple[list, list]:
    """The report's rows and columns from ``runs`` ((version index, {row key: ms}) per run, in
    order): each run's median and NEW / OLD of the means (NaN until both versions have run)."""
    run_columns = [f"{n + 1}: {names[which]}" for n, (which, _) in enumerate(runs)]
    rows = []
    for key in sorted({key for _, times in runs for key in times}):
        row = dict(zip(KEY, key))
        for column, (_, times) in zip(run_columns, runs):
            row[column] = times.get(key, float("nan"))
        means = [[t.get(key, float("nan")) for w, t in runs if w == which] for which in (0, 1)]
        old, new = (statistics.fmean(m) if m else float("nan") for m in means)
        row["new / old"] = new / old
        rows.append(row)
    columns = [(k, k) for k in KEY] + [(c, c, ".4g") for c in run_columns] + [("new / old", "new / old", ".3f")]
    return rows, columns


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="a commit, 'tree', or a folder holding a ring_adasplash package")
    p.add_argument("new", help="a commit, 'tree', or a folder holding a ring_adasplash package")
    p.add_argument("--rounds", type=int, default=2, help="runs of each version (alternating, OLD first)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the report (.md, .csv)")
    args = p.parse_args(ours)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1; got {args.rounds}")
    if any(a == "--out" or a.startswith("--out=") for a in bench_args):
        p.error("--out after '--' is ab.py's to set (one folder per run)")
    device = bench_args[bench_args.index("--device") + 1] if "--device" in bench_args else (
        "cuda" if torch.cuda.is_available() else "cpu")
    stem = f"ab_{common.timestamp()}"
    with tempfile.TemporaryDirectory() as tmp:
        versions = [package(v, os.path.join(tmp, name)) for v, name in ((args.old, "old"), (args.new, "new"))]
        envs = [environment(path) for path, _ in versions]
        names = [name for _, name in versions]
        order = [i if r % 2 == 0 else 1 - i for r in range(args.rounds) for i in (0, 1)]
        planned = ", ".join(f"{n + 1}: {names[which]}" for n, which in enumerate(order))
        header = common.print_header(device, {"old": names[0], "new": names[1], "runs": planned})
        runs = []
        for n, which in enumerate(order):
            print(f"run {n + 1}/{len(order)}: {names[which]}", flush=True)
            runs.append((which, bench(envs[which], bench_args, os.path.join(tmp, f"run{n}"))))
            for key, ms in sorted(runs[-1][1].items()):  # as it comes: a run cut short keeps these
                print(f"  {' '.join(f'{k}={v}' for k, v in zip(KEY, key))}: {ms:.4g} ms", flush=True)
            rows, columns = report_rows(names, runs)  # the report so far, rewritten after every run
            common.write_report(args.out, stem, f"{header}\n- finished runs: {len(runs)} of {len(order)}",
                                common.markdown_table(rows, columns), rows, echo=False)
    common.write_report(args.out, stem, header, common.markdown_table(rows, columns), rows)

if __name__ == "__main__":
    main()
