"""alpha per head and learnable: forward and every gradient, alpha's included, against the
``entmax`` package's ``entmax_bisect`` (its own autograd in float64) and float64 finite
differences, on one device and on every distributed strategy (gloo, 2-4 ranks)."""
import pytest
import torch

import ring_adasplash as ra
from distributed_utils import run_distributed
from helpers import bisect_attention, gather_sequence, rel_err, shard_sequence

pytest.importorskip("entmax")


def _inputs(batch=2, seqlen=45, heads=4, heads_kv=2, dim=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, seqlen, heads_kv, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, seqlen, heads_kv, dim, generator=g, dtype=dtype)
    return q, k, v, torch.randn(batch, seqlen, heads, dim, generator=g, dtype=dtype)


ALPHAS = {
    "mixed": [1.5, 1.25, 2.0, 1.5],  # closed forms' powers beside the general finish, in a GQA group
    "learned": [1.37, 1.81, 1.12, 1.64],
    "one per head, all 1.5": [1.5, 1.5, 1.5, 1.5],
}


@pytest.mark.parametrize("name", list(ALPHAS))
@pytest.mark.parametrize("causal", [True, False])
def test_forward_and_gradients_match_entmax_bisect(name, causal):
    q, k, v, grad_out = _inputs()
    alpha = torch.tensor(ALPHAS[name], dtype=torch.float64)
    ours_in = [t.clone().requires_grad_() for t in (q, k, v, alpha)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, alpha)]
    out = ra.adasplash_func(*ours_in[:3], alpha=ours_in[3], causal=causal)
    ref = bisect_attention(*ref_in[:3], ref_in[3], causal)
    assert rel_err(out, ref) < 1e-9
    got = torch.autograd.grad(out, ours_in, grad_out)
    expected = torch.autograd.grad(ref, ref_in, grad_out)
    for what, a, b in zip(("dq", "dk", "dv", "dalpha"), got, expected):
        assert rel_err(a, b) < 1e-8, what
    assert got[3].shape == alpha.shape


def test_alpha_gradient_matches_finite_differences():
    """float64, relative 1e-6, every head: central differences (at alpha 2, one-sided of second
    order: the range ends there)."""
    q, k, v, grad_out = _inputs(seed=3)
    alpha = torch.tensor([1.5, 1.25, 2.0, 1.7], dtype=torch.float64, requires_grad=True)
    (d_alpha,) = torch.autograd.grad(ra.adasplash_func(q, k, v, alpha=alpha), alpha, grad_out)

    def loss(h, step):
        a = alpha.detach().clone()
        a[h] += step
        return (ra.adasplash_func(q, k, v, alpha=a) * grad_out).sum().item()

    eps = 1e-6
    for h in range(alpha.numel()):
        if alpha[h] < 2:
            numeric = (loss(h, eps) - loss(h, -eps)) / (2 * eps)
        else:
            numeric = (3 * loss(h, 0.0) - 4 * loss(h, -eps) + loss(h, -2 * eps)) / (2 * eps)
        assert abs(numeric - d_alpha[h].item()) <= 1e-6 * max(1.0, abs(numeric)), (h, numeric, d_alpha[h].item())


def test_one_learnable_alpha_shared_by_every_head():
    q, k, v, grad_out = _inputs(seed=4)
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    ref_alpha = alpha.detach().clone().requires_grad_()
    (got,) = torch.autograd.grad(ra.adasplash_func(q, k, v, alpha=alpha), alpha, grad_out)
    (expected,) = torch.autograd.grad(bisect_attention(q, k, v, ref_alpha.expand(4)), ref_alpha, grad_out)
    assert got.shape == () and rel_err(got, expected) < 1e-8


def test_a_per_head_tensor_of_one_value_is_the_float_call():
    q, k, v, _ = _inputs(dtype=torch.float32, seed=5)
    per_head = ra.adasplash_func(q, k, v, alpha=torch.full((4,), 1.5))
    assert torch.equal(per_head, ra.adasplash_func(q, k, v, alpha=1.5))


def test_varlen_and_padding_take_per_head_alpha():
    q, k, v, _ = _inputs(batch=1, seqlen=60, seed=6)
    alpha = torch.tensor([1.5, 2.0, 1.2, 1.5], dtype=torch.float64)
    cu = torch.tensor([0, 25, 60], dtype=torch.int32)
    out = ra.adasplash_varlen_func(q[0], k[0], v[0], cu, cu, 35, 35, alpha=alpha)
    for start, stop in ((0, 25), (25, 60)):
        piece = (x[:, start:stop] for x in (q, k, v))
        assert rel_err(out[start:stop], bisect_attention(*piece, alpha)[0]) < 1e-9


def test_every_head_runs_in_one_spec():
    """A call's heads run as one spec (one set of launches): one value, or one per head whose
    values are all equal, is a float alpha (closed forms' schedule at 1.5 and 2); different values
    per head are a per-head spec, whose ``power`` is one form where every head has it and
    ``POWER_BY_HEAD`` where they differ (1.5 or 2 beside other alphas, or heads on both sides of
    ``APPROX_LOG_MAX_GAMMA``); no values, a table on the device."""
    from ring_adasplash.kernels.entmax_spec import (POWER_BY_HEAD, POWER_GENERAL, POWER_GENERAL_EXACT_LOG,
                                                    call_spec)

    assert call_spec([1.25] * 4).alpha == 1.25 and not call_spec([1.25] * 4).per_head
    assert call_spec([1.5]).closed_form and call_spec([2.0, 2.0]).closed_form
    mixed = call_spec([1.3, 1.5, 2.0, 1.7, 1.5, 1.3])
    assert mixed.per_head and mixed.alpha == (1.3, 1.5, 2.0, 1.7, 1.5, 1.3) and mixed.power == POWER_BY_HEAD
    assert not mixed.closed_form
    assert call_spec([1.2, 1.9, 1.4]).power == POWER_GENERAL
    assert call_spec([1.1, 1.05]).power == POWER_GENERAL_EXACT_LOG
    assert call_spec([1.1, 1.9]).power == call_spec([1.5, 2.0]).power == POWER_BY_HEAD
    table = torch.tensor([1.3, 1.5], dtype=torch.float64)
    on_device = call_spec((), table)
    assert on_device.per_head and on_device.table is table and on_device.heads == 2
    assert on_device.power == POWER_BY_HEAD
    assert call_spec([1.3, 1.5], torch.empty(0, dtype=torch.float64)).table is None  # empty: from the values


def test_a_graph_holds_the_forms_not_the_per_head_values():
    """A CUDA graph of the forward is keyed on ``graph_key``: one alpha (a constant of the
    graph), or of per-head alphas only the forms their kernels were compiled for
    (``EntmaxSpec.power``), not the values (read from the device), so that an alpha moved by
    training replays one graph; a move that changes the compiled forms (onto 1.5 or 2 beside
    general heads, across alpha 1.2) changes the key."""
    from ring_adasplash.kernels.entmax_spec import POWER_BY_HEAD, POWER_GENERAL, graph_key

    by_head = ("per head", POWER_BY_HEAD)
    assert graph_key([1.3, 1.5, 1.7]) == graph_key([1.31, 1.5, 1.69]) == graph_key([1.3, 1.5, 2.0]) == by_head
    assert graph_key([1.3, 1.7]) == ("per head", POWER_GENERAL) != graph_key([1.3, 1.5])
    assert graph_key([1.1, 1.7]) == by_head != graph_key([1.3, 1.7])
    assert graph_key(()) == by_head  # a DeviceAlpha: every form compiled
    assert graph_key([1.25] * 3) != graph_key([1.26] * 3)  # one alpha: a constant of the graph
    assert graph_key([1.4]) == graph_key([1.4] * 3) == (1.4,)


def test_per_head_constants_from_the_device_table_are_the_host_ones():
    """``EntmaxSpec`` with a ``table`` (the alphas as a float64 tensor) gives the per-head
    constants bit for bit as from the host values, in every dtype the kernels and the PyTorch
    path take them; a wrong table shape is named; a spec of one alpha ignores the table."""
    from ring_adasplash.kernels import EntmaxSpec

    values = (1.37, 1.81, 1.12, 1.999)
    host, device = EntmaxSpec(values), EntmaxSpec(values, torch.tensor(values, dtype=torch.float64))
    for key in ("scale_z", "gamma"):
        a, b = host.kernel_constants(0.125, "cpu")[key], device.kernel_constants(0.125, "cpu")[key]
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), key
    for dtype in (torch.float32, torch.float64):
        like = torch.zeros(2, 4, 3, dtype=dtype)
        assert torch.equal(host.gamma_at(like), device.gamma_at(like))
        assert torch.equal(host.scale_z_at(0.3, like), device.scale_z_at(0.3, like))
        sums = torch.randn(2, 4, 3, dtype=dtype)
        assert torch.equal(host.alpha_gradient(sums), device.alpha_gradient(sums))
    assert device == host and device.table is not None
    assert EntmaxSpec((1.5, 1.5), torch.tensor([1.5, 1.5])).table is None
    with pytest.raises(ValueError, match=r"table: expected one alpha per head, shape \(4,\)"):
        EntmaxSpec(values, torch.tensor(values[:3]))


@pytest.mark.parametrize("alpha,match", [
    (torch.tensor([1.5, 1.5]), r"shape \(4,\)"),
    (torch.ones(4, 1) * 1.5, r"shape \(4,\)"),
    (torch.tensor([1.5, 2.5, 1.5, 1.0]), "2.5 at head 1, 1.0 at head 3"),
    (torch.tensor([1, 2, 1, 2]), "floating-point"),
])
def test_bad_alpha_tensors_are_named(alpha, match):
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        ra.adasplash_func(q, q, q, alpha=alpha)


@pytest.mark.parametrize("name", list(ALPHAS))
def test_device_alpha_is_the_alpha_read_on_the_host(name):
    """``DeviceAlpha``: every head in the general form's schedule, its alpha read from the device;
    out and every gradient as the same tensor read on the host gives them (bit for bit where no head is
    1.5 or 2: the same kernels), and within 1e-10 of the closed forms."""
    q, k, v, grad_out = _inputs()
    results = []
    for wrap in (lambda a: a, ra.DeviceAlpha):
        alpha = torch.tensor(ALPHAS[name], dtype=torch.float64, requires_grad=True)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ra.adasplash_func(*inputs, alpha=wrap(alpha))
        results.append([out, *torch.autograd.grad(out, (*inputs, alpha), grad_out)])
    for host, device in zip(*results):
        if name == "learned":
            assert torch.equal(host, device)
        else:
            assert rel_err(device, host) < 1e-10


def test_device_alpha_shared_by_every_head():
    q, k, v, grad_out = _inputs()
    alpha = torch.tensor(1.37, dtype=torch.float64, requires_grad=True)
    out = ra.adasplash_func(q, k, v, alpha=ra.DeviceAlpha(alpha))
    d_alpha, = torch.autograd.grad(out, alpha, grad_out)
    ref_alpha = alpha.detach().clone().requires_grad_()
    ref = ra.adasplash_func(q, k, v, alpha=ref_alpha)
    assert d_alpha.shape == () and rel_err(out, ref) < 1e-12
    assert rel_err(d_alpha, torch.autograd.grad(ref, ref_alpha, grad_out)[0]) < 1e-10


def test_device_alpha_out_of_range_gives_nan_rows_on_its_heads_only():
    q, k, v, _ = _inputs()
    alpha = torch.tensor([1.37, 2.5, 1.12, 1.0], dtype=torch.float64)
    out = ra.adasplash_func(q, k, v, alpha=ra.DeviceAlpha(alpha))
    ref = ra.adasplash_func(q, k, v, alpha=torch.tensor([1.37, 1.5, 1.12, 1.5], dtype=torch.float64))
    assert torch.isnan(out[:, :, [1, 3]]).all()
    assert torch.equal(out[:, :, [0, 2]], ref[:, :, [0, 2]])


def test_the_general_form_takes_its_log_by_the_alphas():
    """``EntmaxSpec.power``: the closed forms at 1.5 and 2; else the log2 that the kernels' powers
    take, chosen on the float32 gamma they are given: the approximate one up to gamma 5 (alpha 1.2,
    included), the correctly rounded one above; and per head where a spec's heads differ in form
    (a closed form beside another, or both logs) or its values are on the device alone."""
    from ring_adasplash.kernels import EntmaxSpec
    from ring_adasplash.kernels.entmax_spec import POWER_BY_HEAD, POWER_GENERAL, POWER_GENERAL_EXACT_LOG

    expected = {1.5: 2, 2.0: 1, 1.75: POWER_GENERAL, 1.2: POWER_GENERAL, 1.19999: POWER_GENERAL_EXACT_LOG,
                1.01: POWER_GENERAL_EXACT_LOG, (1.2, 1.9): POWER_GENERAL, (1.1, 1.15): POWER_GENERAL_EXACT_LOG,
                (1.2, 1.5, 1.9): POWER_BY_HEAD, (1.5, 2.0): POWER_BY_HEAD, (1.1, 1.3): POWER_BY_HEAD,
                (): POWER_BY_HEAD}
    assert {alpha: EntmaxSpec(alpha).power for alpha in expected} == expected


def test_a_spec_of_device_values_needs_its_table():
    """``EntmaxSpec(())`` (values on the device alone) is per head in the general form's schedule,
    its form chosen per head, and what needs its values raises until a table gives them."""
    from ring_adasplash.kernels import EntmaxSpec
    from ring_adasplash.kernels.entmax_spec import POWER_BY_HEAD

    spec = EntmaxSpec(())
    assert (spec.power, spec.closed_form, spec.per_head) == (POWER_BY_HEAD, False, True)
    for use in (lambda: spec.kernel_constants(0.25, "cpu"), lambda: spec.gamma_at(torch.zeros(1, 4, 3))):
        with pytest.raises(ValueError, match="or a table of them; got none"):
            use()
    table = torch.tensor([1.25, 1.5, 1.75, 2.0], dtype=torch.float64)
    gamma = EntmaxSpec((), table).gamma_at(torch.zeros(1, 4, 3, dtype=torch.float64))
    assert torch.equal(gamma.reshape(-1), 1.0 / (table - 1.0))


def test_device_alpha_is_not_read():
    """Its values are never read on the host: on the meta device (no values at all) the check
    passes, where a plain tensor's values are copied to the host."""
    from ring_adasplash.checks import check_head_alpha

    meta = torch.empty(4, device="meta")
    assert check_head_alpha(ra.DeviceAlpha(meta), 4).values == ()
    with pytest.raises(NotImplementedError):
        check_head_alpha(meta, 4)


@pytest.mark.parametrize("alpha,error,match", [
    (torch.ones(2) * 1.5, ValueError, r"shape \(4,\) \(one per query head\); got DeviceAlpha of shape \(2,\)"),
    (torch.tensor([1, 2, 1, 2]), TypeError, "floating-point"),
    (1.5, TypeError, "DeviceAlpha holds a tensor"),
])
def test_bad_device_alphas_are_named(alpha, error, match):
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(error, match=match):
        ra.adasplash_func(q, q, q, alpha=ra.DeviceAlpha(alpha))


# ------------------------------------------------------------------------------------------
# every distributed strategy, 2-4 ranks
# ------------------------------------------------------------------------------------------

# the heads of 1.5 and of 2 (their closed forms' powers) beside two others, every head in the
# general schedule with its alpha read per head (in a ring: the bracket and Newton steps per head)
SEQ_ALPHA = [1.5, 1.25, 2.0, 1.75]


def _strategy_case(rank, world, name, on_device=False):
    """Relative errors of out, dq, dk, dv and dalpha of strategy ``name`` against
    ``bisect_attention`` on the whole sequence. Every rank's alpha gradient is its own part
    (its rows, or its heads under Ulysses): their sum is the whole, as for any other parameter
    that a data-parallel all-reduce sums. The kv-sharded strategy replicates the queries, and
    each rank holds the whole (as it holds the whole dq)."""
    import torch.distributed as dist

    from ring_adasplash import parallel

    seqlen = 2 * world * 24
    q, k, v, grad_out = _inputs(batch=1, seqlen=seqlen, heads=4, heads_kv=2, seed=11)
    alpha = torch.tensor(SEQ_ALPHA, dtype=torch.float64, requires_grad=True)
    given = ra.DeviceAlpha(alpha) if on_device else alpha
    layout, kwargs = "contiguous", {}
    if name == "kv-sharded":
        k_local, v_local = (t.chunk(world, 1)[rank].clone().requires_grad_() for t in (k, v))
        q_local = q.clone().requires_grad_()
        out = parallel.kv_sharded_adasplash_func(q_local, k_local, v_local, alpha=given)
        grads = torch.autograd.grad(out, (q_local, k_local, v_local, alpha), grad_out)
        got = [out, grads[0], *(gather_sequence(t, "contiguous", world) for t in grads[1:3]), grads[3]]
    else:
        fn = {"ring": parallel.ring_adasplash_func, "zigzag": parallel.zigzag_ring_adasplash_func,
              "allgather": parallel.allgather_adasplash_func, "ulysses": parallel.ulysses_adasplash_func}[name]
        if name == "zigzag":
            layout = "zigzag"
        if name == "allgather":
            kwargs = {"heads_per_step": 1}
        local = [shard_sequence(t, layout, rank, world).requires_grad_() for t in (q, k, v)]
        out = fn(*local, alpha=given, **kwargs)
        grads = torch.autograd.grad(out, (*local, alpha), shard_sequence(grad_out, layout, rank, world))
        d_alpha = grads[3].clone()
        dist.all_reduce(d_alpha)
        got = [gather_sequence(t, layout, world) for t in (out, *grads[:3])] + [d_alpha]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, alpha.detach())]
    ref = bisect_attention(*ref_in[:3], ref_in[3])
    expected = [ref, *torch.autograd.grad(ref, ref_in, grad_out)]
    return [rel_err(a, b) for a, b in zip(got, expected)]


def _usp_case(rank, world, on_device=False):
    import torch.distributed as dist

    from ring_adasplash import parallel

    ulysses_group, ring_group = parallel.build_usp_groups(2, world // 2)
    mesh = parallel.UspMesh.from_groups(ulysses_group, ring_group)
    seqlen = 2 * world * 24
    q, k, v, grad_out = _inputs(batch=1, seqlen=seqlen, heads=4, heads_kv=2, seed=12)
    alpha = torch.tensor(SEQ_ALPHA, dtype=torch.float64, requires_grad=True)
    local = [shard_sequence(t, "zigzag", rank, world, mesh).requires_grad_() for t in (q, k, v)]
    out = parallel.usp_adasplash_func(*local, alpha=ra.DeviceAlpha(alpha) if on_device else alpha,
                                      ulysses_group=ulysses_group, ring_group=ring_group)
    grads = torch.autograd.grad(out, (*local, alpha), shard_sequence(grad_out, "zigzag", rank, world, mesh))
    d_alpha = grads[3].clone()
    dist.all_reduce(d_alpha)
    got = [gather_sequence(t, "zigzag", world, mesh) for t in (out, *grads[:3])] + [d_alpha]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, alpha.detach())]
    ref = bisect_attention(*ref_in[:3], ref_in[3])
    expected = [ref, *torch.autograd.grad(ref, ref_in, grad_out)]
    return [rel_err(a, b) for a, b in zip(got, expected)]


def _every_strategy(rank, world, on_device=False):
    names = ("ring", "zigzag", "allgather", "kv-sharded")
    cases = {name: _strategy_case(rank, world, name, on_device) for name in names}
    if world % 2 == 0:
        cases["ulysses"] = _strategy_case(rank, world, "ulysses", on_device)
        cases["usp"] = _usp_case(rank, world, on_device) if world == 4 else cases["ulysses"]
    return cases


def _every_strategy_on_device(rank, world):
    return _every_strategy(rank, world, on_device=True)


@pytest.mark.parametrize("world,on_device", [(2, False), (3, False), (4, False), (2, True), (4, True)])
def test_every_strategy_learns_alpha_per_head(world, on_device):
    """Also with the alpha as a ``DeviceAlpha`` (every head in the general form's schedule)."""
    errors = run_distributed(_every_strategy_on_device if on_device else _every_strategy, world, timeout=400)
    for rank_errors in errors:
        bad = {name: errs for name, errs in rank_errors.items() if max(errs) >= 1e-8}
        assert not bad, f"relative errors (out, dq, dk, dv, dalpha) above 1e-8: {bad}"


def test_device_alpha_compiles_as_one_graph():
    """A learnable alpha as a ``DeviceAlpha`` traces with ``fullgraph=True`` (nothing is read on
    the host) and gives the eager gradients; a plain tensor alpha, whose values are read, cannot."""
    q, k, v, grad_out = _inputs(dtype=torch.float32)
    alpha = torch.tensor([1.37, 1.81, 1.12, 1.64], requires_grad=True)

    def loss(q, k, v, alpha):
        return (ra.adasplash_func(q, k, v, alpha=ra.DeviceAlpha(alpha)) * grad_out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(compiled(*inputs, alpha), (*inputs, alpha))
    expected = torch.autograd.grad(loss(*inputs, alpha), (*inputs, alpha))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = torch.compile(lambda q, k, v, a: ra.adasplash_func(q, k, v, alpha=a).sum(), fullgraph=True,
                          backend="aot_eager")
    with pytest.raises(Exception, match="tolist"):
        plain(q, k, v, alpha)
