"""Ulysses and 2D (Ulysses x ring) sequence parallelism on CPU with gloo against the float64
reference on the full sequence, forward and gradients; USP layout helpers; bad head counts and
bad input on one rank fail on every rank."""
import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed, value_error_message
from helpers import gather_sequence, random_qkv, reference_with_grads, rel_err
from test_distributed_attention import TOL


def _usp_case(rank, world, groups, ring_layout, alpha, causal, heads_q, heads_kv, seed, function=None):
    """Run USP (or ``function(q, k, v, alpha, causal)`` on the same shards); relative errors of
    out, dq, dk, dv on the full sequence."""
    from ring_adasplash.parallel import UspMesh, usp_adasplash_func, usp_shard

    ulysses_group, ring_group = groups
    mesh = UspMesh.from_groups(ulysses_group, ring_group)
    seqlen = 2 * world * 48
    q, k, v, grad_out = random_qkv(1, seqlen, seqlen, heads_q, heads_kv, 16, seed=seed, grad_out=True)
    local = [usp_shard(t, mesh, ring_layout).requires_grad_() for t in (q, k, v)]
    if function is None:
        out = usp_adasplash_func(*local, alpha=alpha, causal=causal, ulysses_group=ulysses_group,
                                 ring_group=ring_group, ring_layout=ring_layout)
    else:
        out = function(*local, alpha=alpha, causal=causal)
    grads = torch.autograd.grad(out, local, usp_shard(grad_out, mesh, ring_layout))
    got = [gather_sequence(t, ring_layout, world, mesh) for t in (out, *grads)]
    return [rel_err(a, b) for a, b in zip(got, reference_with_grads(q, k, v, grad_out, alpha, causal))]


def _world2_cases(rank, world):
    from ring_adasplash.parallel import build_usp_groups, ulysses_adasplash_func

    ulysses_only = (dist.group.WORLD, None)  # the contiguous layout of plain Ulysses
    mesh_1x2, mesh_2x1 = build_usp_groups(1, 2), build_usp_groups(2, 1)
    return {
        "ulysses a1.5 causal": _usp_case(rank, world, ulysses_only, "contiguous", 1.5, True, 4, 4, 1,
                                         ulysses_adasplash_func),
        "ulysses a2 noncausal gqa split": _usp_case(rank, world, ulysses_only, "contiguous", 2.0, False, 4, 2, 2,
                                                    ulysses_adasplash_func),
        "ulysses a1.3 causal mqa replicated": _usp_case(rank, world, ulysses_only, "contiguous", 1.3, True, 4, 1, 3,
                                                        ulysses_adasplash_func),
        "usp 1x2 zigzag gqa": _usp_case(rank, world, mesh_1x2, "zigzag", 1.5, True, 4, 2, 4),
        "usp 2x1 contiguous mqa": _usp_case(rank, world, mesh_2x1, "contiguous", 1.5, True, 4, 1, 5),
    }


def _world4_cases(rank, world):
    from ring_adasplash.parallel import build_usp_groups, ulysses_adasplash_func

    ulysses_only = (dist.group.WORLD, None)
    mesh = build_usp_groups(2, 2)
    return {
        "ulysses a1.5 causal gqa replicated": _usp_case(rank, world, ulysses_only, "contiguous", 1.5, True, 8, 2, 6,
                                                        ulysses_adasplash_func),
        "ulysses a2 noncausal": _usp_case(rank, world, ulysses_only, "contiguous", 2.0, False, 4, 4, 7,
                                          ulysses_adasplash_func),
        "usp 2x2 zigzag gqa": _usp_case(rank, world, mesh, "zigzag", 1.5, True, 4, 2, 8),
        "usp 2x2 contiguous mqa a1.3": _usp_case(rank, world, mesh, "contiguous", 1.3, True, 4, 1, 9),
        "groups": [dist.get_process_group_ranks(g) for g in mesh],
    }


@pytest.mark.distributed
def test_ulysses_and_usp_match_float64_world2():
    errors = run_distributed(_world2_cases, 2, timeout=300)[0]
    bad = {name: errs for name, errs in errors.items() if max(errs) >= TOL}
    assert not bad, f"relative errors (out, dq, dk, dv) above {TOL}: {bad}"


@pytest.mark.distributed
def test_ulysses_and_usp_match_float64_world4():
    results = run_distributed(_world4_cases, 4, timeout=400)
    groups = [r.pop("groups") for r in results]
    # Ulysses groups: consecutive ranks; ring groups: strided by the Ulysses degree.
    assert groups == [[[0, 1], [0, 2]], [[0, 1], [1, 3]], [[2, 3], [0, 2]], [[2, 3], [1, 3]]]
    bad = {name: errs for name, errs in results[0].items() if max(errs) >= TOL}
    assert not bad, f"relative errors (out, dq, dk, dv) above {TOL}: {bad}"


def _errors_on_every_rank(rank, world):
    from ring_adasplash.parallel import build_usp_groups, ulysses_adasplash_func, usp_adasplash_func

    ulysses_group, ring_group = build_usp_groups(2, 2)

    def message(fn, heads_q, heads_kv, seqlen=16, **kwargs):
        q, kv = torch.randn(1, seqlen, heads_q, 16), torch.randn(1, seqlen, heads_kv, 16)
        return value_error_message(lambda: fn(q, kv, kv, **kwargs))

    usp = dict(ulysses_group=ulysses_group, ring_group=ring_group)
    return {
        "heads_q": message(ulysses_adasplash_func, 6, 6),
        "heads_kv": message(ulysses_adasplash_func, 12, 3),
        "usp heads_kv": message(usp_adasplash_func, 6, 3, **usp),
        "usp alpha on one rank": message(usp_adasplash_func, 4, 2, alpha=3.0 if rank == 3 else 1.5, **usp),
        "usp shapes on one rank": message(usp_adasplash_func, 4, 2, seqlen=32 if rank == 1 else 16, **usp),
        "usp layout": message(usp_adasplash_func, 4, 2, ring_layout="striped", **usp),
    }


def test_bad_input_raises_on_every_rank():
    results = run_distributed(_errors_on_every_rank, 4, timeout=120)
    expected = {
        "heads_q": "heads_q=6, Ulysses group size 4",
        "heads_kv": "heads_kv=3, Ulysses group size 4",
        "usp heads_kv": "heads_kv=3, Ulysses group size 2",
        "usp alpha on one rank": "alpha must be in (1, 2]",
        "usp shapes on one rank": "ranks disagree on",
        "usp layout": "ring_layout must be one of",
    }
    for rank, messages in enumerate(results):
        for case, text in expected.items():
            assert text in messages[case], (rank, case, messages[case])


def test_usp_layout_helpers():
    from ring_adasplash.parallel import UspMesh, usp_positions, usp_shard, usp_unshard

    mesh = UspMesh(ulysses_degree=2, ring_degree=2)
    by_rank = [usp_positions(16, mesh.at(r), "zigzag").tolist() for r in range(4)]
    # ring shard 0 = chunks 0 and 3 of 4, ring shard 1 = chunks 1 and 2; each cut in 2 Ulysses pieces
    assert by_rank == [[0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert usp_positions(16, mesh.at(1), "contiguous").tolist() == [4, 5, 6, 7]
    x = torch.randn(2, 48, 3)
    for layout in ("zigzag", "contiguous"):
        shards = [usp_shard(x, mesh.at(r), layout) for r in range(4)]
        assert torch.equal(usp_unshard(shards, mesh, layout), x)
    with pytest.raises(ValueError, match="divisible by ring_degree"):
        usp_positions(6, UspMesh(ulysses_degree=4), "zigzag")


def test_kv_head_rule():
    from ring_adasplash.parallel.ulysses import kv_copies

    assert kv_copies(8, 8, 4) == 1 and kv_copies(8, 4, 4) == 1  # split
    assert kv_copies(8, 2, 4) == 2 and kv_copies(8, 1, 8) == 8  # replicated
    with pytest.raises(ValueError, match="heads_kv=3"):
        kv_copies(12, 3, 2)
    with pytest.raises(ValueError, match="heads_q=6"):
        kv_copies(6, 6, 4)
