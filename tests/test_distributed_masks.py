"""Sliding windows and attention sinks in every distributed strategy, on CPU with gloo, against the
float64 reference with the mask written out (``test_masks.explicit_mask``), forward and gradients;
and the key tiles a ring does not send under a window."""
import functools
import itertools

import pytest
import torch

from distributed_utils import run_distributed, value_error_message
from helpers import gather_sequence, random_qkv, reference_with_grads, rel_err
from test_distributed_attention import TOL
from test_masks import explicit_mask

WINDOW = dict(window_size=(40, 0), sink_tokens=3)


def _sharded(rank, world, fn, shard_layout, causal, mesh=None, heads_q=4, heads_kv=2, seed=1, **options):
    """``fn`` on this rank's ``shard_layout`` shards of a 96-tokens-per-rank sequence with
    ``options``; relative errors of out, dq, dk, dv on the full sequence against the written-out
    mask."""
    layout = shard_layout
    from ring_adasplash.parallel import layouts, usp_shard

    seqlen = 2 * world * 48
    q, k, v, grad_out = random_qkv(1, seqlen, seqlen, heads_q, heads_kv, 16, seed=seed, grad_out=True)
    shard = (lambda t: usp_shard(t, mesh, layout)) if mesh is not None else (
        lambda t: layouts.shard(t, layout, rank, world))
    local = [shard(t).requires_grad_() for t in (q, k, v)]
    out = fn(*local, alpha=1.5, causal=causal, **options)
    options.pop("layout", None)
    grads = torch.autograd.grad(out, local, shard(grad_out))
    got = [gather_sequence(t, layout, world, mesh) for t in (out, *grads)]
    mask = explicit_mask(seqlen, seqlen, causal, options["window_size"], options["sink_tokens"])
    return [rel_err(a, b) for a, b in zip(got, reference_with_grads(q, k, v, grad_out, 1.5, causal, mask=mask))]


def _varlen(rank, world):
    from ring_adasplash.parallel import layouts, ring_adasplash_varlen_func

    lengths = [70, 5, 100, world * 96 - 175]  # documents cross shard boundaries
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    total = int(cu[-1])
    q, k, v, grad_out = (t[0] for t in random_qkv(1, total, total, 4, 2, 16, seed=9, grad_out=True))
    local = [layouts.shard(t, "contiguous", rank, world, dim=0).requires_grad_() for t in (q, k, v)]
    out = ring_adasplash_varlen_func(*local, cu, alpha=1.5, causal=True, **WINDOW)
    grads = torch.autograd.grad(out, local, layouts.shard(grad_out, "contiguous", rank, world, dim=0))
    got = [gather_sequence(t[None], "contiguous", world)[0] for t in (out, *grads)]
    mask = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask[a:b, a:b] = explicit_mask(b - a, b - a, True, WINDOW["window_size"], WINDOW["sink_tokens"])
    ref = reference_with_grads(q[None], k[None], v[None], grad_out[None], 1.5, True, mask=mask)
    return [rel_err(a, b[0]) for a, b in zip(got, ref)]


def _kv_sharded(rank, world):
    from ring_adasplash.parallel import kv_sharded_adasplash_func

    seqlen_q, seqlen_k = 40, world * 64
    q, k, v, grad_out = random_qkv(1, seqlen_q, seqlen_k, 4, 2, 16, seed=10, grad_out=True)
    q = q.requires_grad_()
    k_local, v_local = (t.chunk(world, 1)[rank].clone().requires_grad_() for t in (k, v))
    out = kv_sharded_adasplash_func(q, k_local, v_local, alpha=1.5, causal=True, window_size=(30, -1), sink_tokens=2)
    dq, dk, dv = torch.autograd.grad(out, (q, k_local, v_local), grad_out)
    dk, dv = (gather_sequence(t, "contiguous", world) for t in (dk, dv))
    mask = explicit_mask(seqlen_q, seqlen_k, True, (30, -1), 2)
    expected = reference_with_grads(q, k, v, grad_out, 1.5, True, mask=mask)
    return [rel_err(a, b) for a, b in zip((out, dq, dk, dv), expected)]


def _module_attention(strategy: str):
    """``fn(q, k, v, alpha=, causal=, window_size=, sink_tokens=)`` through ``ParallelAttention``."""
    from ring_adasplash import AttentionConfig, ParallelAttention

    def attend(q, k, v, **options):
        return ParallelAttention(AttentionConfig(strategy=strategy, **options))(q, k, v)

    return attend


def _every_strategy(rank, world):
    from ring_adasplash import parallel as P

    cases = {
        "ring causal": lambda: _sharded(rank, world, P.ring_adasplash_func, "contiguous", True, **WINDOW),
        "ring both sides": lambda: _sharded(rank, world, P.ring_adasplash_func, "contiguous", False,
                                            window_size=(30, 20), sink_tokens=0),
        "zigzag causal": lambda: _sharded(rank, world, P.zigzag_ring_adasplash_func, "zigzag", True, **WINDOW),
        "allgather zigzag": lambda: _sharded(rank, world, P.allgather_adasplash_func, "zigzag", True, layout="zigzag",
                                             **WINDOW),
        "ulysses": lambda: _sharded(rank, world, P.ulysses_adasplash_func, "contiguous", True, **WINDOW),
        "zigzag module": lambda: _sharded(rank, world, _module_attention("zigzag"), "zigzag", True, **WINDOW),
        "varlen ring": lambda: _varlen(rank, world),
        "kv-sharded": lambda: _kv_sharded(rank, world),
    }
    if world == 4:
        mesh_groups = P.build_usp_groups(2, 2)
        mesh = P.UspMesh.from_groups(*mesh_groups)
        usp = functools.partial(P.usp_adasplash_func, ulysses_group=mesh_groups[0], ring_group=mesh_groups[1])
        cases["usp 2x2 zigzag"] = lambda: _sharded(rank, world, usp, "zigzag", True, mesh=mesh, **WINDOW)
    return {name: case() for name, case in cases.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_windows_and_sinks_in_every_strategy(world):
    errors = run_distributed(_every_strategy, world, timeout=400)[0]
    bad = {name: errs for name, errs in errors.items() if max(errs) >= TOL}
    assert not bad, f"relative errors (out, dq, dk, dv) above {TOL}: {bad}"


def _mismatched_window(rank, world):
    from ring_adasplash.parallel import ring_adasplash_func

    q = torch.randn(1, 32, 2, 16)
    return value_error_message(lambda: ring_adasplash_func(q, q, q, window_size=(16, 0) if rank == 0 else (8, 0)))


def test_a_window_that_differs_between_ranks_raises_on_every_rank():
    for message in run_distributed(_mismatched_window, 2, timeout=120):
        assert "window_size" in message, message


def test_config_checks_the_window():
    from ring_adasplash import AttentionConfig

    with pytest.raises(ValueError, match="window_size must be"):
        AttentionConfig(window_size=(-3, 0))
    with pytest.raises(ValueError, match="not supported by the deepspeed strategy"):
        AttentionConfig(strategy="deepspeed", sink_tokens=4)
