"""Exactness against an oracle we did not write (the ``entmax`` package), on score matrices that
break threshold algorithms, for alpha from 1.01 to 2; and the edges of the input space.

Scores are made exact: a query (1, 0, ..., 0) and keys (s_j, 0, ..., 0) with ``softmax_scale=1``
give the score row ``s`` bit for bit in any float dtype, so every family below is the score matrix
it claims to be. With ``v`` the identity (one key per value dimension) the output row is the
probability row, compared entry by entry with the oracle's.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ring_adasplash as ra
from ring_adasplash.kernels.algorithm import SCHEDULE_ENV
from ring_adasplash.reference import entmax_attention_reference

entmax = pytest.importorskip("entmax")

ALPHAS = (1.01, 1.1, 1.25, 1.5, 1.75, 2.0)
COARSE_BINS_PER_UNIT = 15  # the coarse histogram's bin edges lie at multiples of 1/15 of z
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


@pytest.fixture(params=("auto", "histogram"))
def schedule(request, monkeypatch):
    """Both ways of finding tau on one device: ``auto`` is the Newton schedule."""
    monkeypatch.setenv(SCHEDULE_ENV, request.param)
    return request.param


def oracle(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Probability rows (..., Sk) in float64 by the ``entmax`` package."""
    s = scores.double()
    if alpha == 1.5:
        return entmax.entmax15(s, dim=-1)
    if alpha == 2.0:
        return entmax.sparsemax(s, dim=-1)
    return entmax.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=200)


# every family runs the same compiled kernels: on the GPU one head would be a specialization of its
# own (Triton makes integer arguments equal to 1 constants), and float32 kernels compile slowly
MIN_HEADS = 4


def probabilities(scores: torch.Tensor, alpha: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Rows (R, Sk) of scores -> our probabilities (R, Sk): one head per row (repeated up to
    ``MIN_HEADS`` heads), v = identity."""
    rows = scores.shape[0]
    scores = scores.repeat((MIN_HEADS + rows - 1) // rows, 1)
    heads, seqlen_k = scores.shape
    dim = max(16, 1 << (seqlen_k - 1).bit_length())
    q = torch.zeros(1, 1, heads, dim, dtype=dtype, device=device)
    q[..., 0] = 1
    k = torch.zeros(1, seqlen_k, heads, dim, dtype=dtype, device=device)
    k[0, :, :, 0] = scores.t().to(device=device, dtype=dtype)
    v = torch.zeros(1, seqlen_k, heads, dim, dtype=dtype, device=device)
    v[0, :, :, :seqlen_k] = torch.eye(seqlen_k, dtype=dtype, device=device)[:, None, :]
    out = ra.adasplash_func(q, k, v, alpha=alpha, causal=False, softmax_scale=1.0)
    return out[0, 0, :rows, :seqlen_k].double().cpu()


def families(alpha: float, seqlen_k: int = 200, offsets: bool = False) -> dict:
    """Score rows (R, seqlen_k) that break threshold algorithms. ``offsets``: also rows shifted by
    +-1e4 (exact in float64)."""
    g = torch.Generator().manual_seed(0)
    bin_width = 1.0 / (COARSE_BINS_PER_UNIT * (alpha - 1.0))  # one coarse bin, in score units
    noise = torch.randn(4, seqlen_k, generator=g)
    rows = {
        "zeros": torch.zeros(2, seqlen_k),
        "ties at the max": torch.cat([torch.full((2, 3), 2.0), noise[:2, 3:].clamp(max=1.0)], 1),
        "one key holds all the mass": torch.cat([torch.full((2, 1), 5.0 / (alpha - 1)), torch.zeros(2, seqlen_k - 1)], 1),
        "integers": torch.randint(-3, 4, (3, seqlen_k), generator=g).float(),
        "every score on a bin edge": torch.randint(-30, 2, (3, seqlen_k), generator=g).float() * bin_width,
        "tau on a bin edge": torch.cat([torch.full((1, 1), 1.0 / (alpha - 1)), torch.zeros(1, seqlen_k - 1)], 1),
        "random": noise * 3,
    }
    if offsets:
        rows["offset +1e4"] = noise[:2] + 1e4
        rows["offset -1e4"] = noise[:2] - 1e4
    return rows


def _worst(alpha, dtype, **kwargs) -> dict:
    errors = {}
    for name, scores in families(alpha, **kwargs).items():
        errors[name] = (probabilities(scores, alpha, dtype) - oracle(scores.to(dtype), alpha)).abs().max().item()
    return {name: err for name, err in errors.items() if not err <= TOL[dtype]}


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float32_probabilities_match_the_entmax_package(alpha, schedule):
    """Shifted rows too: logits relative to the row max keep float32 accuracy at scores of 1e4."""
    assert not _worst(alpha, torch.float32, offsets=True)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float64_probabilities_match_to_1e9_with_offsets(alpha, schedule):
    """float64 inputs compute in float64 throughout (PyTorch backend), shifted rows included."""
    assert not _worst(alpha, torch.float64, offsets=True)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("spread", (1.0, 0.01))
def test_flat_rows_sum_to_one_at_thousands_of_keys(alpha, spread, schedule):
    """Causal rows of up to 4096 keys whose scores are ``spread`` x N(0, 1) (attention at
    initialisation; at 0.01 dozens of keys share each 1/480-wide sub-bin near tau): rows of p sum
    to 1 in float32."""
    g = torch.Generator().manual_seed(1)
    q, k = (spread * torch.randn(1, 4096, 1, 16, generator=g) for _ in range(2))
    q[..., 0] = 1
    out = ra.adasplash_func(q, k, torch.ones_like(k), alpha=alpha, softmax_scale=1.0, causal=True)
    assert (out - 1).abs().max().item() < 1e-5


def slow_newton_rows(alpha: float, seqlen_k: int) -> dict:
    """Score rows whose keys spread below the max in shapes that make Newton steps on tau crawl
    (at alpha 2 each step of the sort-free sparsemax iteration may drop a single key): evenly
    (ramps), geometrically (keys crowding at the bottom), as a square root or a logarithm (keys
    crowding near the max), over 0.1, 0.5 and 1 in z (the max pass's bound of tau is max - 1)."""
    j = torch.arange(seqlen_k, dtype=torch.float64)
    rows = {}
    for span in (0.1, 0.5, 1.0):
        width = span / (alpha - 1.0)  # z = (alpha - 1) x score
        rows[f"ramp {span}"] = -width * j / seqlen_k
        rows[f"geometric {span}"] = -width * (1 - 0.97 ** j)
        rows[f"square root {span}"] = -width * (j / seqlen_k).sqrt()
        rows[f"logarithm {span}"] = -width * torch.log1p(j) / math.log1p(seqlen_k)
    return rows


@pytest.mark.parametrize("alpha", (1.5, 1.75, 2.0))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_rows_that_slow_newton_steps(alpha, dtype):
    """The Newton schedule (the default on one device, at every alpha) on ``slow_newton_rows`` of
    1024 keys: within the oracle's tolerance, so ten steps suffice on them."""
    rows = slow_newton_rows(alpha, 1024)
    scores = torch.stack(list(rows.values())).to(dtype)
    err = (probabilities(scores.double(), alpha, dtype) - oracle(scores, alpha)).abs().max(-1).values
    bad = {name: e.item() for name, e in zip(rows, err) if not e <= TOL[dtype]}
    assert not bad, bad


@pytest.mark.parametrize("alpha", (1.001, 1.01))
def test_alpha_near_one(alpha):
    """No overflow as alpha -> 1, and rows still sum to 1 (float32 powers of degree 1/(alpha - 1)
    round to about 1e-4 at alpha 1.001)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 1, 256, 1, 64, generator=g)
    out = ra.adasplash_func(q, k, torch.ones_like(k), alpha=alpha, causal=False)
    assert (out - 1).abs().max().item() < (1e-5 if alpha >= 1.01 else 1e-4)
    zeros = torch.zeros(1, 1, 1, 16)
    assert ra.adasplash_func(zeros, zeros, torch.ones_like(zeros), alpha=alpha)[0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0))
def test_gradcheck_float64(alpha):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: ra.adasplash_func(a, b, c, alpha=alpha), (q, k, v), eps=1e-6,
                                    atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(alpha=st.sampled_from(ALPHAS), shift=st.floats(-1e3, 1e3), seed=st.integers(0, 2**16))
def test_properties_float64(alpha, shift, seed):
    """Shift invariance (a constant added to every score of a row), permutation equivariance (keys
    permuted, non-causal) and rows of p summing to 1, in float64."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = ra.adasplash_func(q, k, v, alpha=alpha, causal=False)
    ref = entmax_attention_reference(q, k, v, alpha, causal=False)
    assert (out - ref).abs().max().item() < 1e-9
    # one more dimension adds ``shift`` to every score of a row (scale 1/4 as for 16 dimensions)
    shifted_q = torch.cat([q, torch.ones_like(q[..., :1])], -1)
    shifted_k = torch.cat([k, torch.full_like(k[..., :1], 4 * shift)], -1)
    padded_v = torch.cat([v, torch.zeros_like(v[..., :1])], -1)
    out_shifted = ra.adasplash_func(shifted_q, shifted_k, padded_v, alpha=alpha, causal=False, softmax_scale=0.25)
    assert (out_shifted[..., :16] - out).abs().max().item() < 1e-9 * max(1.0, abs(shift))
    perm = torch.randperm(70, generator=g)
    out_perm = ra.adasplash_func(q, k[:, perm], v[:, perm], alpha=alpha, causal=False)
    assert (out_perm - out).abs().max().item() < 1e-9
    sums = ra.adasplash_func(q, k, torch.ones_like(v), alpha=alpha, causal=False)
    assert (sums - 1).abs().max().item() < 1e-9


def _tiles_holding(marked: torch.Tensor, tile: int = 64) -> torch.Tensor:
    """(S, H) bool: the positions whose run of ``tile`` (the kernels' tiles) holds a marked one."""
    padded = torch.nn.functional.pad(marked.t(), (0, (-marked.shape[0]) % tile))
    return padded.view(marked.shape[1], -1, tile).any(-1).repeat_interleave(tile, -1)[:, :marked.shape[0]].t()


def check_nan_propagation(device="cpu", alpha=1.5):
    """A NaN in q or k makes exactly the output rows that see it NaN, as dense attention does;
    everything else is untouched. Gradients: NaN on those rows' dq and on dk, dv of every key they
    see; finite outside the 64-wide tiles that hold such a row or key (the Triton kernels' products
    of a tile meet the NaN there; the PyTorch path reads it as zero). Two packed documents of 128 tokens, causal."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(256, 2, 16, generator=g).to(device) for _ in range(3))
    cu = torch.tensor([0, 128, 256], dtype=torch.int32, device=device)
    clean = ra.adasplash_varlen_func(q, k, v, cu, cu, 128, 128, alpha=alpha)
    q_bad, k_bad = q.clone(), k.clone()
    k_bad[200, 0, 3] = float("nan")  # key 72 of document 1, head 0
    q_bad[10, 1] = float("nan")  # query 10 of document 0, head 1
    leaves = [t.clone().requires_grad_() for t in (q_bad, k_bad, v)]
    out = ra.adasplash_varlen_func(*leaves, cu, cu, 128, 128, alpha=alpha)
    out.sum().backward()
    bad_rows = torch.zeros(256, 2, dtype=torch.bool, device=device)
    bad_rows[200:, 0] = True  # the rows of document 1 from key 72 on see it
    bad_rows[10, 1] = True
    assert torch.equal(out.isnan().any(-1), bad_rows) and torch.equal(out.isnan().all(-1), bad_rows)
    assert torch.equal(out[~bad_rows], clean[~bad_rows])
    bad_keys = torch.zeros(256, 2, dtype=torch.bool, device=device)
    bad_keys[128:, 0] = True  # every key of document 1 is seen by its last rows
    bad_keys[:11, 1] = True  # keys 0-10 of document 0, seen by query 10
    for grad, bad in ((leaves[0].grad, bad_rows), (leaves[1].grad, bad_keys), (leaves[2].grad, bad_keys)):
        assert not (bad & ~grad.isnan().all(-1)).any()
        assert not (grad.isnan().any(-1) & ~_tiles_holding(bad)).any()


def test_nan_propagates_as_in_dense_attention():
    check_nan_propagation()


def check_nan_keys_under_a_window(device="cpu", products_read_nan_as_zero=True):
    """NaN rows under a sliding window with sinks and grouped key heads: dk and dv are NaN on
    exactly the keys those rows see (the sinks and each row's window; not the keys between two
    rows' windows). The PyTorch path reads a NaN as zero in its products
    (``products_read_nan_as_zero``), so there the NaN keys are exactly those; the Triton kernels'
    products of a tile may also spread it over the key tiles that a query tile holding such a row
    reads, never further."""
    from test_masks import explicit_mask

    seqlen, heads, heads_kv, window, sinks = 320, 4, 2, 20, 2
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, seqlen, h, 16, generator=g) for h in (heads, heads_kv, heads_kv))
    nan_rows = {2: (40, 250), 1: (100,)}  # query head: rows (heads 2 and 3 share key head 1)
    for head, rows in nan_rows.items():
        q[0, list(rows), head, 0] = float("nan")
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = ra.adasplash_func(*leaves, causal=True, window_size=(window, 0), sink_tokens=sinks)
    out.sum().backward()
    visible = explicit_mask(seqlen, seqlen, True, (window, 0), sinks)
    bad_keys = torch.zeros(seqlen, heads_kv, dtype=torch.bool)
    reach = torch.zeros(seqlen, heads_kv, dtype=torch.bool)  # keys of the key tiles the NaN rows' query tiles read
    tile = 64
    for head, rows in nan_rows.items():
        for row in rows:
            bad_keys[:, head // (heads // heads_kv)] |= visible[row]
            first = row // tile * tile
            seen = visible[first:first + tile].any(0)
            reach[:, head // (heads // heads_kv)] |= _tiles_holding(seen[:, None], tile)[:, 0]
    for grad in leaves[1].grad[0], leaves[2].grad[0]:
        nan_keys = grad.isnan().any(-1).cpu()
        assert not (bad_keys & ~grad.isnan().all(-1).cpu()).any()
        if products_read_nan_as_zero:
            assert torch.equal(nan_keys, bad_keys)
        else:
            assert not (nan_keys & ~(bad_keys | reach)).any()
    # the keys between the windows of rows 40 and 250 (key tile 1) are finite
    assert torch.isfinite(leaves[1].grad[0, 64:128, 1]).all() and torch.isfinite(leaves[2].grad[0, 64:128, 1]).all()


def test_nan_keys_under_a_window_are_the_keys_seen():
    check_nan_keys_under_a_window()


@pytest.mark.parametrize("shapes", [((0, 16, 2, 16), (0, 16, 2, 16)), ((1, 16, 0, 16), (1, 16, 0, 16)),
                                    ((0, 16, 4, 16), (0, 8, 2, 16))])
def test_empty_batch_or_heads_give_empty_results(shapes):
    q, k = (torch.randn(shape, requires_grad=True) for shape in shapes)
    v = torch.randn(shapes[1], requires_grad=True)
    out = ra.adasplash_func(q, k, v)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_alpha_tensors():
    """A one-element tensor is the float call; a learnable one gets its gradient (the learnable
    alpha's own tests: test_learnable_alpha.py); a tensor of the wrong shape is named."""
    q = torch.randn(1, 8, 2, 16)
    assert torch.equal(ra.adasplash_func(q, q, q, alpha=torch.tensor(1.5)), ra.adasplash_func(q, q, q, alpha=1.5))
    learnable = torch.tensor(1.5, requires_grad=True)
    ra.adasplash_func(q, q, q, alpha=learnable).sum().backward()
    assert learnable.grad is not None and torch.isfinite(learnable.grad)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ra.adasplash_func(q, q, q, alpha=torch.tensor([1.5, 1.5, 1.5]))


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", (1.1, 1.25, 1.5, 2.0))
def test_gpu_probabilities_match_the_entmax_package(alpha):
    """float32 on the GPU: the oracle families within 1e-5; bfloat16: the families whose scores
    bfloat16 holds exactly (zeros, integers, one-key rows) within bfloat16's output rounding."""
    for name, scores in families(alpha, seqlen_k=128, offsets=True).items():
        err = (probabilities(scores, alpha, device="cuda") - oracle(scores, alpha)).abs().max().item()
        assert err <= 1e-5, (name, err)
        if name in ("zeros", "integers", "one key holds all the mass"):
            exact = scores.to(torch.bfloat16)
            err = (probabilities(exact, alpha, torch.bfloat16, "cuda") - oracle(exact, alpha)).abs().max().item()
            assert err <= 1e-2, (name, "bf16", err)


def gpu_flat_rows_error(alpha) -> float:
    """How far from 1 the rows of p sum, on causal flat rows of up to 8192 keys on the GPU."""
    g = torch.Generator().manual_seed(1)
    q, k = (0.01 * torch.randn(1, 8192, 2, 64, generator=g) for _ in range(2))
    q[..., 0] = 1
    q, k = q.cuda(), k.cuda()
    out = ra.adasplash_func(q, k, torch.ones_like(k), alpha=alpha, softmax_scale=1.0, causal=True)
    return (out - 1).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", (1.01, 1.25, 1.5, 2.0))
@pytest.mark.filterwarnings("error:ring_adasplash. CUDA graph capture")
def test_gpu_flat_rows_sum_to_one(alpha, schedule):
    """Also: the same call under the other schedule setting (the fixture runs both) is captured
    as a graph of its own, not one whose kernels the first setting compiled."""
    assert gpu_flat_rows_error(alpha) < 1e-5


@pytest.mark.gpu
def test_gpu_nan_propagates():
    check_nan_propagation("cuda")
    check_nan_keys_under_a_window("cuda", products_read_nan_as_zero=False)
