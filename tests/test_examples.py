"""What a new user runs first: the README quickstart and ``examples/sequence_parallel.py`` under
torchrun, each in its own process, on CPU (the example also on two GPUs where there are two); and
the scripts a contributor runs: the training example's capture, the before-and-after benchmark."""
from __future__ import annotations

import csv
import importlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def checkout_env(**extra: str) -> dict:
    """This process's environment with this checkout first on the import path, one thread per
    process, and ``extra``."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]), **extra)


def run(args: list[str], cwd: Path, hide_gpus: bool = False) -> subprocess.CompletedProcess:
    """Run ``args`` in ``checkout_env()``; on timeout the whole process group goes (torchrun's
    ranks included)."""
    env = checkout_env()
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} still running after {TIMEOUT_S} s:\n{out}")
    return subprocess.CompletedProcess(args, proc.returncode, out)


def quickstart_code() -> str:
    """The first python block under "## Quickstart" in README.md."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## Quickstart\n" in readme, "README.md has no ## Quickstart section"
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "no python block under ## Quickstart in README.md"
    return block.group(1)


@pytest.mark.distributed
def test_sequence_parallel_example_under_torchrun(tmp_path):
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(ROOT / "examples" / "sequence_parallel.py")],
                 cwd=tmp_path, hide_gpus=torch.cuda.device_count() < 2)
    assert result.returncode == 0, result.stdout
    assert "ok" in result.stdout.splitlines(), result.stdout


def test_ab_benchmark_compares_a_commit_with_the_tree(tmp_path):
    """``benchmarks/ab.py``: HEAD's package (out of git) and the working tree's, alternating, one
    CPU row; every run's median printed as the run ends (what a run cut short by a time limit
    leaves), and all of them and the ratio of the means in the report."""
    result = run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), "HEAD", "tree", "--rounds", "2", "--out",
                  str(tmp_path), "--", "--device", "cpu", "--rows", "128:32:1.0", "--heads", "2", "--impls", "ours",
                  "--modes", "fwd", "--warmup-ms", "1", "--rep-ms", "5"], cwd=ROOT)
    assert result.returncode == 0, result.stdout
    printed = [line for line in result.stdout.splitlines()
               if line.startswith("  impl=ours mode=fwd seqlen=128 head_dim=32 amp=1.0: ")]
    assert len(printed) == 4, result.stdout
    (report,) = tmp_path.glob("ab_*.csv")
    with open(report) as f:
        (row,) = list(csv.DictReader(f))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert [c for c in row if ":" in c] == [f"1: {head}", "2: tree", "3: tree", f"4: {head}"], row
    times = [float(row[c]) for c in row if ":" in c]
    assert all(t > 0 for t in times)
    old, new = (times[0] + times[3]) / 2, (times[1] + times[2]) / 2
    assert float(row["new / old"]) == pytest.approx(new / old)


def test_ab_benchmark_report_keeps_the_runs_before_a_cut(tmp_path, monkeypatch):
    """``benchmarks/ab.py`` writes its report after every run: a call that stops in its third run
    (a time limit) leaves the first two runs' medians on disk, their ratio, and how many runs of
    how many finished."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    ab = importlib.import_module("ab")
    monkeypatch.setattr(ab, "environment", lambda path: {})
    calls = []

    def bench(env, bench_args, out):
        calls.append(out)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's signal leaves
        return {("ours", "fwd", "128", "32", "1.0"): 2.0 * len(calls)}

    monkeypatch.setattr(ab, "bench", bench)
    with pytest.raises(KeyboardInterrupt):
        ab.main(["tree", "tree", "--rounds", "2", "--out", str(tmp_path), "--", "--device", "cpu"])
    (report,) = tmp_path.glob("ab_*.csv")
    with open(report) as f:
        (row,) = list(csv.DictReader(f))
    assert [c for c in row if ":" in c] == ["1: tree", "2: tree"], row
    assert float(row["new / old"]) == pytest.approx(4.0 / 2.0)
    (markdown,) = tmp_path.glob("ab_*.md")
    assert "- finished runs: 2 of 4" in markdown.read_text()


def test_adasplash_precompile_splits_every_autotuned_kernel(monkeypatch):
    """``benchmarks/adasplash_precompile.py``: the workers' shares of a kernel's configurations
    partition them, within one of each other in size; ``--plan`` (no GPU) finds AdaSplash's
    autotuned kernels in the modules of its package and gives every configuration to a worker."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import adasplash_precompile

    configs = list(range(30))
    for parts, offset in ((1, 0), (4, 3), (16, 30), (64, 5)):
        split = [adasplash_precompile.share(configs, part, parts, offset) for part in range(parts)]
        assert sorted(c for part in split for c in part) == configs
        assert max(map(len, split)) - min(map(len, split)) <= 1
    with pytest.raises(ValueError, match="part must be in"):
        adasplash_precompile.share(configs, 4, 4)

    pytest.importorskip("adasplash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # interpreted, AdaSplash does not autotune
    result = run([sys.executable, str(ROOT / "benchmarks" / "adasplash_precompile.py"), "--plan", "--workers", "16"],
                 cwd=ROOT, hide_gpus=True)
    assert result.returncode == 0, result.stdout
    kernels = {}  # name: (configurations, each worker's share of them)
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"(\S+): (\d+) configurations; per worker ((?:\d+ ){15}\d+)", line)
        assert match, line
        kernels[match.group(1)] = (int(match.group(2)), [int(c) for c in match.group(3).split()])
    attention = [f"adasplash.adasplash_v2.{k}" for k in ("_get_tau", "_get_output", "_bwd_q_kernel", "_bwd_kv_kernel")]
    assert set(attention) <= set(kernels), result.stdout
    for name, (total, counts) in kernels.items():
        assert total > 1 and sum(counts) == total, (name, total, counts)


def test_readme_quickstart_runs(tmp_path):
    result = run([sys.executable, "-c", quickstart_code()], cwd=tmp_path)
    assert result.returncode == 0, result.stdout


@pytest.mark.distributed
def test_training_example_captures_attention_inputs_in_sequence_order(tmp_path):
    """``launch/train.py --capture``: every layer's q, k, v in sequence order, the same from two
    zigzag ranks as from one (after two steps: up to the rounding of the all-reduced gradients),
    and a block sparsity per layer and head."""
    captures = {}
    for world in (1, 2):
        path = tmp_path / f"capture{world}.pt"
        result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                      str(ROOT / "launch" / "train.py"), "--strategy", "zigzag", "--steps", "2", "--capture",
                      str(path)], cwd=ROOT / "launch", hide_gpus=True)
        assert result.returncode == 0, result.stdout
        assert len(re.findall(r"capture: layer \d block sparsity per head( \d\.\d{3}){2}\n", result.stdout)) == 2
        captures[world] = torch.load(path)
    one, two = (captures[w]["layers"] for w in (1, 2))
    assert len(one) == len(two) == 2 and one[0]["q"].shape == (8, 512, 2, 32)
    for layer_one, layer_two in zip(one, two):
        for name in "qkv":
            torch.testing.assert_close(layer_two[name], layer_one[name], rtol=1e-3, atol=1e-3)


@pytest.mark.distributed
def test_training_example_curriculum_runs_its_stages_in_order(tmp_path):
    """``launch/train.py --curriculum``: the shorter sequences first, each stage for its steps
    with the tokens of a step kept (batch x seqlen), a log line at the end of each stage, and
    the summary of the last one (two zigzag ranks)."""
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(ROOT / "launch" / "train.py"), "--strategy", "zigzag", "--seqlen", "256", "--batch", "2",
                  "--curriculum", "64:3,128:2", "--steps", "2", "--log-every", "100"],
                 cwd=ROOT / "launch", hide_gpus=True)
    assert result.returncode == 0, result.stdout
    assert "curriculum: 3 steps at seqlen=64 batch=8 first" in result.stdout, result.stdout
    assert "curriculum: 2 steps at seqlen=128 batch=4 first" in result.stdout, result.stdout
    logged = re.findall(r"step +(\d+)  seqlen (\d+)  loss", result.stdout)
    assert logged == [("3", "64"), ("5", "128"), ("7", "256")], result.stdout
    assert "summary: strategy=zigzag engine=plain world=2 seqlen=256 " in result.stdout


def test_training_example_rejects_a_curriculum_that_does_not_fit(tmp_path):
    """A stage whose length does not divide the tokens of a step, or a malformed stage, is an
    error that names --curriculum, before any process group starts."""
    for stages, expected in (("96:2", "each SEQLEN must divide batch x seqlen"), ("64-2", "SEQLEN:STEPS")):
        result = run([sys.executable, str(ROOT / "launch" / "train.py"), "--seqlen", "256", "--batch", "2",
                      "--curriculum", stages], cwd=ROOT / "launch", hide_gpus=True)
        assert result.returncode == 2 and "--curriculum" in result.stdout and expected in result.stdout, result.stdout


def test_recall_tasks_of_a_curriculum_share_one_vocabulary():
    """``RecallTask.for_seqlen(L, key_tokens=...)``: every length reads the same token ids (keys,
    values, placeholder), so a model trained on short sequences answers with the same ids on
    long ones; each answer is the value written after its key in the first half."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        from data import IGNORE, RecallTask
    finally:
        sys.path.remove(str(ROOT / "launch"))
    final = RecallTask.for_seqlen(8192)
    for seqlen in (64, 256, 8192):
        task = RecallTask.for_seqlen(seqlen, key_tokens=final.key_tokens)
        assert (task.vocab_size, task.placeholder, task.key_tokens) == (final.vocab_size, final.placeholder,
                                                                         final.key_tokens)
        tokens, targets = task.sample(3, torch.Generator().manual_seed(seqlen))
        assert tokens.max() < task.vocab_size and tokens.min() >= 0
        half = seqlen // 2
        for b in range(3):
            asked = (targets[b] != IGNORE).nonzero().flatten()
            assert len(asked) == task.queries and bool((asked >= half).all())
            assert bool((tokens[b, asked + 1] == task.placeholder).all())
            for i in asked.tolist():
                written = (tokens[b, :half - 1] == tokens[b, i]).nonzero().flatten()
                assert len(written) == task.repeats  # the key, written repeats times, each time before its value
                assert bool((tokens[b, written + 1] == targets[b, i]).all())
    with pytest.raises(ValueError, match="key_tokens"):
        RecallTask(seqlen=64, pairs=8, repeats=1, queries=4, key_tokens=4)


@pytest.mark.distributed
def test_training_example_learns_alpha_per_head(tmp_path):
    """``launch/train.py --learn-alpha`` on two zigzag ranks: the loss falls and the heads' alphas
    (a DeviceAlpha, read by the kernels on the device), all 1.5 at the start, move apart."""
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(ROOT / "launch" / "train.py"), "--strategy", "zigzag", "--learn-alpha", "--steps", "12"],
                 cwd=ROOT / "launch", hide_gpus=True)
    assert result.returncode == 0, result.stdout
    summary = re.search(r"first_loss=([\d.]+) final_loss=([\d.]+)", result.stdout)
    assert summary and float(summary[2]) < float(summary[1]) - 0.3, result.stdout
    learned = [float(a) for line in re.findall(r"learned alpha: layer \d per head ([\d. ]+)", result.stdout)
               for a in line.split()]
    assert len(learned) == 4 and all(1.0 < a < 2.0 for a in learned), learned
    assert len(set(learned)) > 1, learned  # printed to three decimals: apart by 1e-3 at least


@pytest.mark.distributed
def test_distributed_benchmark_with_a_window_sends_less_than_full_causal(tmp_path):
    """``benchmarks/bench_distributed.py --window``: every entmax strategy and the one-GPU rows
    take the window, FlexAttention with the same window is the dense baseline, and a ring with a
    window of a quarter of the sequence sends less than one without (two gloo ranks, CPU)."""
    reports = {}
    for name, extra in (("window", ["--window", "128", "--impls", "onegpu,flex1,ring,zigzag"]),
                        ("causal", ["--impls", "onegpu,ring,zigzag"])):
        out = tmp_path / name
        result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      str(ROOT / "benchmarks" / "bench_distributed.py"), "--device", "cpu", "--seqlens", "512",
                      "--heads", "2", "--head-dim", "16", "--dtype", "fp32", "--modes", "fwd", "--warmup", "0",
                      "--iters", "1", "--out", str(out), *extra], cwd=ROOT, hide_gpus=True)
        assert result.returncode == 0, result.stdout
        (report,) = out.glob("distributed_*.csv")
        with open(report) as f:
            reports[name] = {row["strategy"]: row for row in csv.DictReader(f)}
    windowed, causal = reports["window"], reports["causal"]
    assert set(windowed) == {"onegpu", "flex1", "ring", "zigzag"}, windowed
    for name, row in windowed.items():
        assert not row.get("error") and float(row["fwd_ms"]) > 0, row
        assert row["window"] == "128", row
    for name in ("ring", "zigzag"):
        assert 0 < float(windowed[name]["bytes_sent"]) < float(causal[name]["bytes_sent"]), (windowed[name],
                                                                                           causal[name])


def test_distributed_benchmark_refuses_a_window_for_baselines_without_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_distributed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert bench_distributed.parse_args(["--window", "64"]).impls == bench_distributed.WINDOWED_IMPLS
    for argv in (["--window", "64", "--impls", "onegpu,torch_cp"], ["--window", "0"], ["--impls", "flex1,ring"]):
        with pytest.raises(SystemExit):
            bench_distributed.parse_args(argv)


@pytest.mark.distributed
def test_two_gpu_script_runs_its_parts_on_cpu(tmp_path):
    """``benchmarks/two_gpu.sh`` with ``SMOKE=1``: its window, long-sequence and packed-documents
    parts, tiny, on two gloo ranks, each writing its report; an unknown part is refused."""
    env = checkout_env(SMOKE="1", PARTS="window million packed", REPORT_OUT=str(tmp_path))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "two_gpu.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = sorted(tmp_path.glob("distributed_*.csv"))
    assert len(reports) == 3, result.stdout  # the window, 1M and 4M runs
    with open(reports[0]) as f:
        rows = {row["strategy"]: row for row in csv.DictReader(f)}
    assert rows["zigzag"]["window"] == "128" and float(rows["zigzag"]["fwd_ms"]) > 0, rows
    (packed,) = tmp_path.glob("ring_packed_*.csv")
    with open(packed) as f:
        rows = {row["doc_len"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"256", "1024"}, rows
    # four documents of 256 tokens, 512 tokens a rank: no document straddles the two ranks, so the
    # packed ring sends nothing, while the batch's ring sends every document's other half
    assert float(rows["256"]["packed_mb_sent"]) == 0 < float(rows["256"]["batch_mb_sent"]), rows["256"]
    assert all(float(row[f"ratio_{mode}"]) > 0 for row in rows.values() for mode in ("fwd", "fwdbwd")), rows
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "two_gpu.sh")], cwd=ROOT,
                         env=dict(env, PARTS="nonsense"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'nonsense'" in bad.stderr, bad.stderr


def test_dense_regime_captured_part_trains_captures_and_times_each_layer(tmp_path):
    """``benchmarks/dense_regime.sh``'s captured part with ``SMOKE=1``: the example trains (a
    curriculum stage, then its length), saves every layer's q, k, v, and the report has ours and
    SDPA on each of the two layers (amp = the layer), the training's log beside it."""
    capture = tmp_path / "qkv.pt"
    env = checkout_env(SMOKE="1", PARTS="captured", REPORT_OUT=str(tmp_path), CAPTURE_PATH=str(capture))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "dense_regime.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    (log,) = tmp_path.glob("captured_train_*.log")
    text = log.read_text()
    assert "curriculum: 2 steps at seqlen=64 batch=8 first" in text and "capture: saved q, k, v of 2 layers" in text
    assert len(torch.load(capture)["layers"]) == 2
    (report,) = tmp_path.glob("kernels_*.csv")
    with open(report) as f:
        rows = list(csv.DictReader(f))
    ours = {(row["mode"], float(row["amp"])) for row in rows if row["impl"] == "ours" and float(row["ms"]) > 0}
    assert ours == {(m, a) for m in ("fwd", "fwdbwd") for a in (0.0, 1.0)}, rows
    assert {row["impl"] for row in rows} == {"ours", "sdpa"}, rows
    # the CPU counts of the captured rows: candidates per query tile, and Newton sweeps
    for script, options in (("candidate_counts.py", ["--heads", "0,1", "--every", "1"]),
                            ("newton_sweeps.py", ["--heads", "2", "--amps", "0,1"])):
        counted = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--family", "captured",
                                  "--captured", str(capture), "--seqlen", "256", "--head-dim", "16", *options],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert counted.returncode == 0, counted.stdout + counted.stderr
        table = [line for line in counted.stdout.splitlines() if line.startswith("| ") and "---" not in line]
        assert len(table) == 3, counted.stdout  # a header and two rows (two heads, or two layers)
        if script == "newton_sweeps.py":  # each sweep's point lies higher: never more candidates above it
            for row in table[1:]:
                counts = [float(c) for c in row.strip("| ").split("|")[-1].split(",")]
                assert counts == sorted(counts, reverse=True) and counts[0] >= 1, row


def test_dense_regime_script_runs_its_parts_on_cpu(tmp_path):
    """``benchmarks/dense_regime.sh`` with ``SMOKE=1``: its mixed-family and sparse parts, tiny, on
    the CPU, each writing a report with ours and SDPA in both modes; an unknown part is refused."""
    env = checkout_env(SMOKE="1", PARTS="mixed sparse", REPORT_OUT=str(tmp_path))
    script = str(ROOT / "benchmarks" / "dense_regime.sh")
    result = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = sorted(tmp_path.glob("kernels_*.csv"))
    assert len(reports) == 2, result.stdout  # one a part
    for report, amp, seqlens in zip(reports, ("1.0", "2.0"), ({"256", "512"}, {"512"})):
        with open(report) as f:
            rows = list(csv.DictReader(f))
        ours = [row for row in rows if row["impl"] == "ours"]
        assert {(row["mode"], row["seqlen"]) for row in ours} == {(m, s) for m in ("fwd", "fwdbwd") for s in seqlens}
        assert all(row["amp"] == amp and float(row["ms"]) > 0 for row in ours), ours
        assert {row["impl"] for row in rows} == {"ours", "sdpa"}, rows
    bad = subprocess.run(["bash", script], cwd=ROOT, env=dict(env, PARTS="nonsense"), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "unknown part 'nonsense'" in bad.stderr, bad.stderr


def test_backward_settings_script_checks_its_arguments():
    """``benchmarks/backward_settings.py``: a setting that is not warps:stages:step (step 16, 32 or
    64) is refused with the form it expects; without a GPU it says it needs one."""
    script = str(ROOT / "benchmarks" / "backward_settings.py")
    env = checkout_env()
    bad = subprocess.run([sys.executable, script, "--kernel", "dkdv", "4:2:48"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert bad.returncode == 2 and "warps:stages:step with step 16, 32 or 64; got '4:2:48'" in bad.stderr, bad.stderr
    if not torch.cuda.is_available():
        cpu = subprocess.run([sys.executable, script, "--kernel", "dq", "4:2:32"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        assert cpu.returncode == 2 and "needs a CUDA GPU" in cpu.stderr, cpu.stderr
