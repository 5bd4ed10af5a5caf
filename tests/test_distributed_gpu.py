"""Every distributed path on two GPUs with NCCL and the Triton kernels, against the float64
reference on the full sequence: forward and gradients, bf16 (2e-2 relative) and fp32 (1e-3
relative: the kernels' fp32 dot products may use TF32 inputs on GPUs). Skipped without two GPUs.
"""
import functools

import pytest
import torch

from distributed_utils import run_distributed
from helpers import gather_sequence, random_qkv, reference_with_grads, rel_err, shard_sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
SEQLEN, HEADS, KV_HEADS, DIM = 2048, 4, 2, 64


def _strategies(world):
    """name -> (attention on local shards, ring layout, USP mesh or None): every strategy of
    ``ring_adasplash.config`` that needs no other package, the 2D one on a world x 1 mesh."""
    from ring_adasplash import parallel as P
    from ring_adasplash.config import STRATEGIES, one_group_strategies

    table = {s.name: (s.load(), s.layout, None) for s in one_group_strategies(include_missing=True)
             if s.package is None}
    usp = STRATEGIES["usp"]
    ulysses_group, ring_group = P.build_usp_groups(world, 1)
    mesh = P.UspMesh.from_groups(ulysses_group, ring_group)
    table[usp.name] = (functools.partial(usp.load(), ulysses_group=ulysses_group, ring_group=ring_group,
                                         ring_layout=usp.layout), usp.layout, mesh)
    return table


def _all_paths(rank, world):
    torch.cuda.set_device(rank)
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        for alpha, seed in ((1.5, 1), (2.0, 2)):
            # rounded to dtype first: the reference sees the same inputs as the kernels
            q, k, v, grad_out = random_qkv(1, SEQLEN, SEQLEN, HEADS, KV_HEADS, DIM, amp=1.5, seed=seed,
                                           structured=True, grad_out=True, dtype=dtype)
            reference = reference_with_grads(q, k, v, grad_out, alpha, True, device="cuda")
            for name, (fn, layout, mesh) in _strategies(world).items():
                local = [shard_sequence(t, layout, rank, world, mesh).to("cuda", dtype).requires_grad_()
                         for t in (q, k, v)]
                out = fn(*local, alpha=alpha, causal=True)
                grads = torch.autograd.grad(out, local,
                                            shard_sequence(grad_out, layout, rank, world, mesh).to("cuda", dtype))
                assert all(t.dtype == dtype for t in (out, *grads)), name
                got = [gather_sequence(t, layout, world, mesh).cpu() for t in (out, *grads)]
                errors[f"{name} {dtype} alpha={alpha}"] = (dtype, [rel_err(a, b) for a, b in zip(got, reference)])
    return errors


def test_every_path_matches_float64_on_two_gpus():
    errors = run_distributed(_all_paths, 2, timeout=600, backend="nccl")[0]
    bad = {name: errs for name, (dtype, errs) in errors.items() if max(errs) >= TOL[dtype]}
    print("\n".join(f"{name}: out/dq/dk/dv rel err {['%.1e' % e for e in errs]}"
                    for name, (_, errs) in errors.items()))
    assert not bad, f"relative errors (out, dq, dk, dv) above tolerance: {bad}"
