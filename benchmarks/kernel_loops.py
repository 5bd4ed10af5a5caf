"""What one trip of each kernel loop costs, in instructions, without a GPU: the forward's kernels
(with ``--backward`` the backward's too) compiled for sm_90 the way they launch (one H100 or
H200), and their loops read off the SASS.

    python benchmarks/kernel_loops.py --family scattered --head-dim 128
    python benchmarks/kernel_loops.py --head-dim 64 --kernels candidate_schedule_kernel,max_kernel

Two processes, as ``tests/offline_compile.py`` runs them: the first runs one forward under
Triton's interpreter (Triton backend, ``--seqlen`` tokens, every query tile on the candidate
keys) and records each launch's arguments; the second compiles each recorded specialization
with Triton's own ptxas and disassembles it with ``nvdisasm`` (shipped with Triton's NVIDIA
backend). Per kernel: registers and stack (spills) a thread takes; per loop (a backward branch),
its instructions, its tensor-core ops (``HGMMA``), local-memory loads and stores (spills) and the
most frequent opcodes. A loop over key tiles with ``HGMMA`` is one trip per key tile (or per
``UNROLL`` tiles), so its instruction count is what a tile costs a program; the same loop in the
max kernel is the floor of a Q.K^T sweep. Static counts: what runs is for the GPU to measure.
The code is that of the Triton that compiles it, and differs between versions (Triton 3.9 spills
the candidate kernel at D 128, 4.7 KB a thread; 3.6 compiles it without spills): ``--compiler``
names a Python whose Triton is the GPU machines' version, installed beside this one, e.g.

    python3 -m venv --system-site-packages /tmp/triton36 && /tmp/triton36/bin/pip install triton==3.6.0
    python benchmarks/kernel_loops.py --head-dim 128 --compiler /tmp/triton36/bin/python

(the interpreted forward still runs on this Python's Triton).

``--adasplash BMxBN``: instead, AdaSplash 0.2.2's backward kernels (``_bwd_q_kernel``,
``_bwd_kv_kernel``, its AdaSplash-2 path) compiled the same way at that tile (it autotunes the
tile with its forward), 4 warps and 2 stages, ``--heads`` heads, ``--seqlen`` tokens: their loops
beside ours, e.g. ``--backward --head-dim 64`` against ``--adasplash 64x64 --head-dim 64``.
"""
import argparse
import collections
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import common  # noqa: E402
import offline_compile  # noqa: E402
from inputs import FAMILIES  # noqa: E402


def _tool(name: str) -> str:
    """Path of one of Triton's NVIDIA binaries (ptxas, nvdisasm, cuobjdump)."""
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def capture(args, path: str) -> None:
    """One interpreted forward of ``args``' inputs, its launches recorded into ``path``."""
    import torch

    import ring_adasplash as ra
    from inputs import make_qkv
    from ring_adasplash.kernels import triton_backend

    triton_backend.FEW_TILES = 0  # every query tile on the candidate keys, as on long rows
    q, k, v = (x.requires_grad_(args.backward) for x in
               make_qkv(args.family, 1, args.seqlen, args.heads, args.head_dim, args.amp, torch.bfloat16, "cpu"))
    with offline_compile.recorded_launches() as launched:
        head_alphas = common.head_alphas(args.head_alphas, args.alpha, args.heads)
        # a per-head tensor is learnable, as in bench_kernels.py: the backward then sums dL/dalpha
        alpha = args.alpha if head_alphas is None else torch.tensor(head_alphas, requires_grad=args.backward)
        out = ra.adasplash_func(q, k, v, alpha=ra.DeviceAlpha(alpha) if args.device_alpha else alpha)
        if args.backward:
            out.float().sum().backward()
    with open(path, "wb") as f:
        pickle.dump({key: calls[:1] for key, calls in launched.items()}, f)


def instructions(sass: str) -> tuple[list, dict]:
    """The instructions of ``nvdisasm -c`` output (opcode with modifiers, predicate dropped) and
    the index of each label."""
    ops, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[int(label.group(1))] = len(ops)
            continue
        ins = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if ins:
            words = ins.group(1).split()
            ops.append((words[1] if words[0].startswith("@") else words[0], ins.group(1)))
    return ops, labels


def loops(ops: list, labels: dict) -> list:
    """(first, last) instruction index of every loop: a branch back to a label at or before it."""
    found = set()
    for i, (_, text) in enumerate(ops):
        target = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", text)
        if target and labels.get(int(target.group(1)), len(ops)) <= i:
            found.add((labels[int(target.group(1))], i))
    return sorted(found)


def report(name: str, cubin: str, min_loop: int) -> None:
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    resources = " ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+)", usage))
    sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    ops, labels = instructions(sass)
    print(f"\n{name}: {len(ops)} instructions; {resources}")
    print("| loop (instructions) | per trip | HGMMA | LDL / STL (spills) | most frequent |\n|---|---|---|---|---|")
    for first, last in loops(ops, labels):
        counts = collections.Counter(op.split(".")[0] for op, _ in ops[first:last + 1])
        if counts["HGMMA"] == 0 and last - first + 1 < min_loop:
            continue
        common_ops = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
        print(f"| {first}-{last} | {last - first + 1} | {counts['HGMMA']} | {counts['LDL']} / {counts['STL']} | "
              f"{common_ops} |")


# AdaSplash's backward kernels: their pointer arguments that are not bf16 (the rest are q, k, v,
# dO and the gradients), by parameter name
ADASPLASH_BACKWARD = ("_bwd_q_kernel", "_bwd_kv_kernel")
ADASPLASH_POINTERS = {"TAUS": "*fp32", "D": "*fp32", "BMASK": "*i32", "VARLEN": "*i32"}


def compile_adasplash(folder: str, tile: str, args) -> None:
    """AdaSplash's backward kernels compiled for sm_90 with this Python's Triton at ``tile``
    (``BMxBN``), as cubins in ``folder`` listed in ``compiled.json`` (``compile_into``'s form)."""
    import importlib
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module("adasplash.adasplash_v2")
    block_m, block_n = (int(x) for x in tile.split("x"))
    constants = dict(H_DIM=args.head_dim, N_H=args.heads, N_KV_H=args.heads, GROUP_SIZE=1, N_CTX=args.seqlen,
                     N_INT32s=-(-args.seqlen // block_n // 32), IS_VARLEN=False, BLOCK_M=block_m, BLOCK_N=block_n)
    binaries, failures = [], []
    for name in ADASPLASH_BACKWARD:
        fn = getattr(module, name).fn  # under its autotuner
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(inspect.signature(fn.fn).parameters):
            if param in constants:
                signature[param], constexprs[(index,)] = "constexpr", constants[param]
                continue
            signature[param] = ("fp32" if param == "sm_scale" else "i32" if param.startswith("stride")
                                else ADASPLASH_POINTERS.get(param, "*bf16"))
            if param != "sm_scale":
                attrs[(index,)] = [["tt.divisibility", 16]]
        try:
            binary = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        except Exception as error:  # noqa: BLE001 - reported with the others
            failures.append(f"{name}: {type(error).__name__}: {str(error)[-1500:]}")
            continue
        path = os.path.join(folder, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(binary.asm["cubin"])
        binaries.append((f"adasplash {name} {tile}", path))
    with open(os.path.join(folder, "compiled.json"), "w") as f:
        json.dump({"triton": triton.__version__, "binaries": binaries, "failures": failures}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="scattered", help="input family (inputs.py)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens of the interpreted forward (only its "
                                                            "specializations matter)")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--amp", type=float, default=1.0, help="input amplitude")
    common.add_alpha_arguments(p)  # a per-head tensor is learnable where --backward runs
    p.add_argument("--backward", action="store_true", help="the backward's kernels too (the forward then "
                                                            "keeps the backward's sums)")
    p.add_argument("--kernels", type=common.csv_list(str), default=[], help="kernel names to report (default: all)")
    p.add_argument("--min-loop", type=int, default=300, help="report loops without HGMMA from this many "
                                                             "instructions on")
    p.add_argument("--compiler", default=sys.executable, metavar="PYTHON",
                   help="the Python whose Triton compiles the kernels (default: this one)")
    p.add_argument("--adasplash", metavar="BMxBN", help="AdaSplash 0.2.2's backward kernels at this tile instead "
                                                        "(module doc)")
    p.add_argument("--capture", metavar="PATH", help=argparse.SUPPRESS)  # the interpreted half
    p.add_argument("--compile", metavar="DIR", help=argparse.SUPPRESS)  # the compiling half
    args = common.check_alpha_arguments(p, p.parse_args())
    if args.capture:
        capture(args, args.capture)
        return
    if args.compile:
        if args.adasplash:
            compile_adasplash(args.compile, args.adasplash, args)
        else:
            compile_into(args.compile, args.kernels)
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if not args.adasplash:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--capture", os.path.join(tmp, "launches.pkl")],
                           check=True, env=env | {"TRITON_INTERPRET": "1", "RING_ADASPLASH_BACKEND": "triton"})
        subprocess.run([args.compiler, __file__, *sys.argv[1:], "--compile", tmp], check=True, env=env)
        with open(os.path.join(tmp, "compiled.json")) as f:
            compiled = json.load(f)
        for failure in compiled["failures"]:
            print("FAILED", failure)
        common.print_header("cpu", {"target": "sm_90 (offline)", "compiled by": f"triton {compiled['triton']}",
                                    "family": args.family, "heads": args.heads, "head_dim": args.head_dim,
                                    "alpha": args.alpha, "dtype": "bf16"})
        for name, path in compiled["binaries"]:
            report(name, path, args.min_loop)


def compile_into(folder: str, kernels: list) -> None:
    """Compile the launches recorded in ``folder`` with this Python's Triton: each kernel of
    ``kernels`` (all if empty) as a cubin there, listed with the failures and Triton's version in
    ``compiled.json``."""
    import triton

    binaries = []

    def keep(name, binary):
        if not kernels or name in kernels:
            path = os.path.join(folder, f"{name}_{len(binaries)}.cubin")
            with open(path, "wb") as f:
                f.write(binary.asm["cubin"])
            binaries.append((name, path))

    _, failures = offline_compile.compile_all(os.path.join(folder, "launches.pkl"), on_binary=keep)
    with open(os.path.join(folder, "compiled.json"), "w") as f:
        json.dump({"triton": triton.__version__, "binaries": binaries, "failures": failures}, f)


if __name__ == "__main__":
    main()
