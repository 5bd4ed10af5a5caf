"""Every distributed path on CPU with gloo against the float64 reference on the full sequence,
forward and gradients; bytes skipped on a local-attention input; bad input fails on all ranks."""
import itertools

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed, value_error_message
from helpers import gather_sequence, positional_code, random_qkv, reference_with_grads, rel_err

TOL = 1e-4


def _sharded_case(rank, world, fn, shard_layout, alpha, causal, heads_q, heads_kv, seed, **kwargs):
    """Run ``fn`` on this rank's shards; return relative errors of out, dq, dk, dv (full sequence)."""
    from ring_adasplash.parallel import layouts

    seqlen = 2 * world * 48
    q, k, v, grad_out = random_qkv(1, seqlen, seqlen, heads_q, heads_kv, 16, seed=seed, grad_out=True)
    local = [layouts.shard(t, shard_layout, rank, world).requires_grad_() for t in (q, k, v)]
    out = fn(*local, alpha=alpha, causal=causal, **kwargs)
    grads = torch.autograd.grad(out, local, layouts.shard(grad_out, shard_layout, rank, world))
    got = [gather_sequence(t, shard_layout, world) for t in (out, *grads)]
    return [rel_err(a, b) for a, b in zip(got, reference_with_grads(q, k, v, grad_out, alpha, causal))]


def _varlen_case(rank, world, alpha, causal, seed):
    from ring_adasplash.kernels.visibility import varlen_visibility
    from ring_adasplash.parallel import layouts, ring_adasplash_varlen_func

    lengths = [70, 5, 100, world * 96 - 175]  # documents cross shard boundaries
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    q, k, v, grad_out = (t[0] for t in random_qkv(1, int(cu[-1]), int(cu[-1]), 4, 2, 16, seed=seed, grad_out=True))
    local = [layouts.shard(t, "contiguous", rank, world, dim=0).requires_grad_() for t in (q, k, v)]
    out = ring_adasplash_varlen_func(*local, cu, alpha=alpha, causal=causal)
    grads = torch.autograd.grad(out, local, layouts.shard(grad_out, "contiguous", rank, world, dim=0))
    got = [gather_sequence(t[None], "contiguous", world)[0] for t in (out, *grads)]
    ref = reference_with_grads(q[None], k[None], v[None], grad_out[None], alpha, causal,
                     visibility=varlen_visibility(cu, cu, causal))
    return [rel_err(a, b[0]) for a, b in zip(got, ref)]


def _kv_sharded_case(rank, world, alpha, causal, seed):
    from ring_adasplash.parallel import kv_sharded_adasplash_func

    seqlen_q, seqlen_k = 40, world * 64
    q, k, v, grad_out = random_qkv(1, seqlen_q, seqlen_k, 4, 2, 16, seed=seed, grad_out=True)
    q = q.requires_grad_()
    k_local, v_local = (t.chunk(world, 1)[rank].clone().requires_grad_() for t in (k, v))
    out = kv_sharded_adasplash_func(q, k_local, v_local, alpha=alpha, causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k_local, v_local), grad_out)
    dk, dv = (gather_sequence(t, "contiguous", world) for t in (dk, dv))
    expected = reference_with_grads(q, k, v, grad_out, alpha, causal)
    return [rel_err(a, b) for a, b in zip((out, dq, dk, dv), expected)]


def _all_paths(rank, world):
    from ring_adasplash.parallel import (allgather_adasplash_func, ring_adasplash_func,
                                         zigzag_ring_adasplash_func)

    cases = {
        "ring a1.5 causal": lambda: _sharded_case(rank, world, ring_adasplash_func, "contiguous", 1.5, True, 4, 4, 1),
        "ring a2 noncausal gqa": lambda: _sharded_case(rank, world, ring_adasplash_func, "contiguous", 2.0, False,
                                                       4, 2, 2),
        "ring a1.3 causal mqa": lambda: _sharded_case(rank, world, ring_adasplash_func, "contiguous", 1.3, True,
                                                      4, 1, 3),
        "zigzag a1.5 causal gqa": lambda: _sharded_case(rank, world, zigzag_ring_adasplash_func, "zigzag", 1.5, True,
                                                        4, 2, 4),
        "zigzag a2 causal": lambda: _sharded_case(rank, world, zigzag_ring_adasplash_func, "zigzag", 2.0, True,
                                                  2, 2, 5),
        "allgather a1.5 causal": lambda: _sharded_case(rank, world, allgather_adasplash_func, "contiguous", 1.5, True,
                                                       4, 2, 6, heads_per_step=1),
        "allgather zigzag a1.3": lambda: _sharded_case(rank, world, allgather_adasplash_func, "zigzag", 1.3, False,
                                                       4, 2, 7, layout="zigzag"),
        "varlen ring a1.5 causal": lambda: _varlen_case(rank, world, 1.5, True, 8),
        "varlen ring a2 noncausal": lambda: _varlen_case(rank, world, 2.0, False, 9),
        "kv-sharded a1.5 causal": lambda: _kv_sharded_case(rank, world, 1.5, True, 10),
        "kv-sharded a1.3 noncausal": lambda: _kv_sharded_case(rank, world, 1.3, False, 11),
    }
    return {name: case() for name, case in cases.items()}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_path_matches_float64(world):
    errors = run_distributed(_all_paths, world, timeout=400)[0]
    bad = {name: errs for name, errs in errors.items() if max(errs) >= TOL}
    assert not bad, f"relative errors (out, dq, dk, dv) above {TOL}: {bad}"


def _local_attention_bytes(rank, world):
    """Keys match queries only nearby: most remote key tiles are exactly zero and are not sent."""
    from ring_adasplash import telemetry
    from ring_adasplash.parallel import layouts, ring_adasplash_func

    seqlen, heads, dim = world * 256, 2, 32
    base = positional_code(seqlen, dim, 3.0, base=500.0)
    g = torch.Generator().manual_seed(21)
    q = base + 0.3 * torch.randn(1, seqlen, heads, dim, generator=g)
    k = base + 0.3 * torch.randn(1, seqlen, heads, dim, generator=g)
    v = torch.randn(1, seqlen, heads, dim, generator=g)
    grad_out = torch.randn(1, seqlen, heads, dim, generator=g)
    local = [layouts.shard(t, "contiguous", rank, world).requires_grad_() for t in (q, k, v)]
    with telemetry.record() as t:
        out = ring_adasplash_func(*local, alpha=1.5, causal=False)
        grads = torch.autograd.grad(out, local, layouts.shard(grad_out, "contiguous", rank, world))
    got = [gather_sequence(x, "contiguous", world) for x in (out, *grads)]
    errors = [rel_err(a, b) for a, b in zip(got, reference_with_grads(q, k, v, grad_out, 1.5, False))]
    return errors, t.bytes_by_pass, t.block_sparsity


def test_local_attention_sends_fewer_bytes_than_dense_ring():
    results = run_distributed(_local_attention_bytes, 4, timeout=300)
    for errors, by_pass, sparsity in results:
        assert max(errors) < TOL, errors
        sent, dense = by_pass["output"]
        assert sent < 0.6 * dense, f"output pass sent {sent} of {dense} dense-ring bytes"
        assert by_pass["max"][0] == by_pass["max"][1]  # the max pass is dense
        assert sparsity > 0.5


def _mismatched_shapes(rank, world):
    from ring_adasplash.parallel import ring_adasplash_func

    seqlen = 64 if rank == 0 else 32
    q = torch.randn(1, seqlen, 2, 16)
    return value_error_message(lambda: ring_adasplash_func(q, q, q))


def _bad_alpha_on_one_rank(rank, world):
    from ring_adasplash.parallel import zigzag_ring_adasplash_func

    q = torch.randn(1, 32, 2, 16)
    return value_error_message(lambda: zigzag_ring_adasplash_func(q, q, q, alpha=3.0 if rank == 1 else 1.5))


def _odd_zigzag(rank, world):
    from ring_adasplash.parallel import zigzag_ring_adasplash_func

    q = torch.randn(1, 33, 2, 16)
    return value_error_message(lambda: zigzag_ring_adasplash_func(q, q, q))


@pytest.mark.parametrize("case, expected", [
    (_mismatched_shapes, "ranks disagree on k, q"),
    (_bad_alpha_on_one_rank, "alpha must be in (1, 2]"),
    (_odd_zigzag, "must be divisible by 6"),
])
def test_bad_input_raises_on_every_rank(case, expected):
    messages = run_distributed(case, 3, timeout=60)
    assert all(expected in m for m in messages), messages
