"""The Newton schedule (``RING_ADASPLASH_SCHEDULE=newton``, alpha up to 1.5): tau by Newton steps
alone. The oracle families of ``test_exactness`` against the ``entmax`` package, on the PyTorch
path (the interpreted Triton kernels: ``test_triton_kernels``); a ring over gloo; and ranks that
disagree on the schedule."""
from __future__ import annotations

import pytest
import torch

import ring_adasplash as ra
from distributed_utils import run_distributed, value_error_message
from helpers import random_qkv, reference_with_grads, rel_err
from ring_adasplash.kernels import EntmaxSpec, stats
from ring_adasplash.kernels import torch_blockwise as TB
from ring_adasplash.kernels.algorithm import SCHEDULE_ENV, SingleBlock, default_schedule, entmax_forward
from ring_adasplash.kernels.visibility import causal_visibility
from test_exactness import TOL, _worst

NEWTON_ALPHAS = (1.01, 1.1, 1.25, 1.5, 1.75, 2.0)


@pytest.fixture
def newton(monkeypatch):
    monkeypatch.setenv(SCHEDULE_ENV, "newton")


def test_the_variable_picks_the_schedule(monkeypatch):
    # auto: Newton where a query block holds all its keys
    assert default_schedule() == "histogram"
    assert default_schedule(one_block=True) == "newton"
    monkeypatch.setenv(SCHEDULE_ENV, "histogram")
    assert default_schedule(one_block=True) == "histogram"
    monkeypatch.setenv(SCHEDULE_ENV, "newton")
    assert default_schedule() == "newton"
    monkeypatch.setenv(SCHEDULE_ENV, "fast")
    with pytest.raises(ValueError, match="RING_ADASPLASH_SCHEDULE must be one of auto, newton, histogram"):
        default_schedule()


@pytest.mark.parametrize("alpha", NEWTON_ALPHAS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_oracle_families_with_offsets(newton, alpha, dtype):
    assert not _worst(alpha, dtype, offsets=True)


@pytest.mark.parametrize("alpha", NEWTON_ALPHAS)
@pytest.mark.parametrize("spread", (1.0, 0.01))
def test_flat_rows_sum_to_one(newton, alpha, spread):
    """As ``test_exactness.test_flat_rows_sum_to_one_at_thousands_of_keys``: a flat row moves
    sqrt(n) times more mass per unit of tau, which the stopping rule must account for."""
    g = torch.Generator().manual_seed(1)
    q, k = (spread * torch.randn(1, 4096, 1, 16, generator=g) for _ in range(2))
    q[..., 0] = 1
    out = ra.adasplash_func(q, k, torch.ones_like(k), alpha=alpha, softmax_scale=1.0, causal=True)
    assert (out - 1).abs().max().item() < TOL[torch.float32]


@pytest.mark.parametrize("alpha", (1.25, 1.5))
def test_gradcheck_float64(newton, alpha):
    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *t: ra.adasplash_func(*t, alpha=alpha, causal=True), (q, k, v))


def test_rows_converge_in_a_few_passes_on_attention_like_rows():
    """Causal rows of structured attention at 2048 tokens: every row is done after at most five
    passes (the schedule allows NEWTON_SCHEDULE_STEPS), and no pass runs after; counted through the
    PyTorch path's state. The exact stop (from the third pass, ``stats.newton_step``) leaves at most
    1% of the rows live after it (without it, 121 of 4096 rows)."""
    log = []
    step = TB.newton_step

    def counting(state, *args):
        new = step(state, *args)
        log.append(int((~new.done).sum()))
        return new

    q, k, v = random_qkv(1, 2048, 2048, 2, 2, 32, seed=4)[:3]
    vis = causal_visibility(2048, 2048, True, "cpu")
    TB.newton_step = counting
    try:
        entmax_forward(TB, q, SingleBlock(k, v, vis), EntmaxSpec(1.5), 32 ** -0.5, schedule="newton")
    finally:
        TB.newton_step = step
    assert 2 <= len(log) <= 5 and log[0] > 0 and log[-1] == 0 and 0 not in log[:-1], log
    assert len(log) < 3 or log[2] <= 0.01 * q.shape[1] * q.shape[2], log


def _sums_at(z: torch.Tensor, t: float, closest: bool = True) -> torch.Tensor:
    """The Newton pass's sums of one row ``z`` (float64) at ``t``, as ``newton_moments_pass`` takes
    them: sum gap^2, sum gap, count, and the smallest gap (+inf where none)."""
    gap = (z - t).clamp(min=0)
    sums = [(gap * gap).sum(), gap.sum(), (gap > 0).sum().double()]
    if closest:
        sums.append(gap[gap > 0].min() if (gap > 0).any() else torch.tensor(float("inf"), dtype=torch.float64))
    return torch.stack(sums)[None]


def test_the_exact_stop_takes_the_closed_form_only_where_no_key_lies_between():
    """alpha 1.5, one row with tau against the ``entmax`` package (``entmax15`` of 2 z): from a
    point between the highest key left out and tau, one step with the smallest gap lands on tau
    (float64 rounding) and stops; without the gap, the tolerances do not stop it there. From a
    point below a key that tau leaves out (the closed form on the keys above the point then lies
    past that key, above tau), the step does not stop, and its point stays below tau."""
    from entmax import entmax15

    z = torch.tensor([0.0, -0.05, -0.2, -0.45, -0.5, -0.9, -3.0], dtype=torch.float64)
    p = entmax15(2 * z, dim=-1)
    support = p > 0
    assert 1 < int(support.sum()) < len(z)  # keys on both sides of tau
    tau = float((z[support] - p[support].sqrt()).mean())  # p = (z - tau)^2 on the support
    left_out = float(z[~support].max())
    spec = EntmaxSpec(1.5)

    def step(t, closest):
        start = stats.NewtonState.of(*(torch.tensor([v], dtype=torch.float64) for v in (t, z.max() - 1, z.max())),
                                     torch.tensor([False]))
        return stats.newton_step(start, _sums_at(z, t, closest), spec, 2e-6, 1e-6)

    settled = left_out + 0.5 * (tau - left_out)
    state = step(settled, closest=True)
    assert bool(state.done[0]) and abs(float(state.point[0]) - tau) < 1e-14, (float(state.point[0]), tau)
    state = step(settled, closest=False)
    assert not bool(state.done[0]) and float(state.point[0]) < tau - 1e-9
    below = left_out - 0.01  # the left-out key lies above this point
    state = step(below, closest=True)
    assert not bool(state.done[0]) and float(state.point[0]) < tau


def _ring_with_newton(rank, world):
    import os

    from helpers import gather_sequence
    from ring_adasplash.parallel import layouts, zigzag_ring_adasplash_func

    os.environ[SCHEDULE_ENV] = "newton"
    seqlen = world * 96
    q, k, v, grad_out = random_qkv(1, seqlen, seqlen, 4, 2, 16, seed=5, grad_out=True)
    local = [layouts.shard(t, "zigzag", rank, world).requires_grad_() for t in (q, k, v)]
    out = zigzag_ring_adasplash_func(*local, alpha=1.5, causal=True)
    grads = torch.autograd.grad(out, local, layouts.shard(grad_out, "zigzag", rank, world))
    got = [gather_sequence(t, "zigzag", world) for t in (out, *grads)]
    return [rel_err(a, b) for a, b in zip(got, reference_with_grads(q, k, v, grad_out, 1.5, True))]


def test_zigzag_ring_with_the_newton_schedule():
    from test_distributed_attention import TOL as DIST_TOL

    for errors in run_distributed(_ring_with_newton, 2, timeout=300):
        assert max(errors) < DIST_TOL, errors


def _mismatched_schedule(rank, world):
    import os

    from ring_adasplash.parallel import ring_adasplash_func

    os.environ[SCHEDULE_ENV] = "newton" if rank == 0 else "histogram"
    q = torch.randn(1, 32, 2, 16)
    return value_error_message(lambda: ring_adasplash_func(q, q, q))


def test_a_schedule_that_differs_between_ranks_raises_on_every_rank():
    for message in run_distributed(_mismatched_schedule, 2, timeout=120):
        assert "schedule" in message, message


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", (1.1, 1.25, 1.5))
def test_gpu_oracle_families_and_flat_rows(newton, alpha):
    """The compiled kernels with the Newton schedule: the oracle families with offsets in float32
    within 1e-5, and flat causal rows of 8192 keys summing to 1 (float32 sums on the GPU: the
    stopping rules must hold above their noise)."""
    from test_exactness import families, gpu_flat_rows_error, oracle, probabilities

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    for name, scores in families(alpha, seqlen_k=128, offsets=True).items():
        err = (probabilities(scores, alpha, device="cuda") - oracle(scores, alpha)).abs().max().item()
        assert err <= 1e-5, (name, err)
    assert gpu_flat_rows_error(alpha) < 1e-5


@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0))
def test_column_floor_starts_below_tau_and_saves_sweeps(alpha, monkeypatch):
    """The one-block schedule's start (``torch_blockwise.column_floor``), float64, 1024 causal keys:
    head 0 flat (z spread evenly over one below the max: the captured family's first layer, a
    support of about a seventh of the keys), head 1 ties (every key equal), head 2 a support of 10
    keys in 10 distinct key positions and the rest far below (the columns' tau is tau itself: only
    the margin keeps the start below it), a NaN score in one row of head 1. The start is never
    above tau, is ``stats.FLOOR_MARGIN`` below it on head 2's rows that see the whole support, and
    is the reference on the NaN row; on head 0 the schedule takes fewer sweeps than from the
    reference alone, to the same tau."""
    g = torch.Generator().manual_seed(3)
    n = 1024
    q = torch.zeros(1, n, 3, 16, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, n, 3, 16, dtype=torch.float64)
    k[0, :, 0, 0] = -torch.rand(n, generator=g, dtype=torch.float64) / (alpha - 1.0)
    k[0, :, 1, 0] = 1.0
    support = torch.arange(10) * 65  # key positions 0 ... 9 of tiles 0 ... 9
    k[0, :, 2, 0] = -20.0
    k[0, support, 2, 0] = 0.05 * torch.arange(10, dtype=torch.float64)
    q[0, 700, 1, 0] = float("nan")
    v = torch.randn(1, n, 3, 16, generator=g, dtype=torch.float64)
    blocks, spec = SingleBlock(k, v, causal_visibility(n, n, True, "cpu")), EntmaxSpec(alpha)
    starts, sweeps = [], []
    column_floor, moments_pass = TB.column_floor, TB.newton_moments_pass

    def recording_floor(problem, tiles, reference, row_max):
        start = column_floor(problem, tiles, reference, row_max)
        starts.append((reference, start))
        return start

    def counting_pass(problem, tiles, point, rows=None, **options):
        sweeps.append(stats.per_query_tile(rows, problem.block_m, "any")[0, 0].sum().item())
        return moments_pass(problem, tiles, point, rows, **options)

    monkeypatch.setattr(TB, "newton_moments_pass", counting_pass)
    monkeypatch.setattr(TB, "column_floor", recording_floor)
    with_floor = entmax_forward(TB, q, blocks, spec, 1.0, schedule="newton")
    sweeps_with, sweeps[:] = sum(sweeps), []
    monkeypatch.setattr(TB, "column_floor", lambda problem, tiles, reference, row_max: reference)
    without = entmax_forward(TB, q, blocks, spec, 1.0, schedule="newton")
    sweeps_without = sum(sweeps)
    (reference, start), = starts
    tau = with_floor.tau
    finite = torch.isfinite(tau)
    assert finite[0, 0].all() and finite[0, 2].all() and not finite[0, 1, 700]
    assert (start[finite] <= tau[finite]).all()
    sees_all = torch.arange(n) >= int(support[-1])
    assert torch.allclose(start[0, 2, sees_all], tau[0, 2, sees_all] - stats.FLOOR_MARGIN, rtol=0, atol=1e-9)
    assert start[0, 1, 700] == reference[0, 1, 700]
    torch.testing.assert_close(tau[finite], without.tau[finite], rtol=0, atol=1e-9)
    torch.testing.assert_close(with_floor.out, without.out, rtol=0, atol=1e-9, equal_nan=True)
    assert sweeps_with < sweeps_without
