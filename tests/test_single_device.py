"""One device, CPU path: forward and gradients against the float64 reference, shard statistics adding up,
the block mask, and input errors."""
import functools
import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ring_adasplash as ra
from helpers import random_qkv, rel_err
from kernel_helpers import no_floor, problem, statistics_pass
from ring_adasplash.kernels import EntmaxSpec
from ring_adasplash.kernels import stats as S
from ring_adasplash.kernels import torch_blockwise as tb
from ring_adasplash.kernels.algorithm import SingleBlock, entmax_forward
from ring_adasplash.kernels.visibility import causal_visibility, key_tile_span, varlen_visibility
from ring_adasplash.reference import entmax_attention_reference, entmax_bisect

ALPHAS = (1.5, 2.0, 1.3)


random_qkv = functools.partial(random_qkv, requires_grad=True)  # leaves, as the gradient checks need


def check_against_reference(q, k, v, alpha, causal, tol, fn=None, ref_kwargs=None):
    fn = fn or (lambda a, b, c: ra.adasplash_func(a, b, c, alpha=alpha, causal=causal))
    out = fn(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = entmax_attention_reference(qd, kd, vd, alpha, causal, **(ref_kwargs or {}))
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    assert torch.isfinite(out).all()
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e} >= {tol}"


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 130, 130, 4, 4, 32), (1, 70, 200, 4, 2, 64), (2, 150, 90, 6, 1, 16)],
                         ids=["self-mha", "sq<sk-gqa", "sq>sk-mqa"])
def test_fp32_matches_float64(alpha, causal, shape):
    batch, sq, sk, hq, hkv, dim = shape
    q, k, v = random_qkv(batch, sq, sk, hq, hkv, dim, seed=hash((alpha, causal, shape)) % 2**31)
    check_against_reference(q, k, v, alpha, causal, tol=1e-4)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_bf16_matches_float64(alpha):
    q, k, v = random_qkv(1, 128, 128, 4, 2, 64, dtype=torch.bfloat16, seed=3)
    check_against_reference(q, k, v, alpha, True, tol=2e-2)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_per_sequence_reference(alpha, causal):
    lens_q, lens_k = [37, 64, 1, 90], [50, 64, 20, 90]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
    q, k, v = random_qkv(1, cu_q[-1], cu_k[-1], 4, 2, 32, seed=5)
    q, k, v = (t.detach()[0].requires_grad_() for t in (q, k, v))

    def fn(a, b, c):
        return ra.adasplash_varlen_func(a, b, c, cu_q, cu_k, max(lens_q), max(lens_k), alpha=alpha, causal=causal)

    vis = varlen_visibility(cu_q, cu_k, causal)
    out = fn(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = entmax_attention_reference(qd[None], kd[None], vd[None], alpha, causal, visibility=vis)[0]
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert rel_err(a, b) < 1e-4


def test_row_without_visible_key_is_zero_not_nan():
    # Sq > Sk with bottom-right causal alignment: the first Sq - Sk queries see no key.
    q, k, v = random_qkv(1, 20, 8, 2, 2, 16, seed=7)
    out = ra.adasplash_func(q, k, v, alpha=1.5, causal=True)
    assert torch.equal(out[:, :12], torch.zeros_like(out[:, :12]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :12], torch.zeros_like(q.grad[:, :12]))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_tau_within_1e5_of_float64_on_every_row(alpha):
    q, k, v = random_qkv(2, 256, 256, 4, 4, 64, dtype=torch.float64, amp=3.0, seed=11)
    vis = causal_visibility(256, 256, True, "cpu")
    fwd = entmax_forward(tb, q.detach(), SingleBlock(k.detach(), v.detach(), vis), EntmaxSpec(alpha), 64 ** -0.5)
    _, ref_tau = entmax_attention_reference(q.detach(), k.detach(), v.detach(), alpha, True, return_tau=True)
    err = (fwd.absolute_tau((alpha - 1) * 64 ** -0.5) - ref_tau).abs() / ref_tau.abs().clamp(min=1.0)
    assert err.max().item() < 1e-5


def _local_qkv(seqlen, dim, heads=2, scale=3.0, noise=0.3, seed=1):
    """Keys and queries sharing a sinusoidal position code: attention concentrates near the diagonal."""
    pos = torch.arange(seqlen)[:, None] * (1000.0 ** (-torch.arange(dim // 2) / (dim // 2)))[None]
    base = torch.cat([pos.cos(), pos.sin()], -1)[None, :, None] * scale
    g = torch.Generator().manual_seed(seed)
    q = base + noise * torch.randn(1, seqlen, heads, dim, generator=g)
    k = base + noise * torch.randn(1, seqlen, heads, dim, generator=g)
    v = torch.randn(1, seqlen, heads, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("layout", ["causal", "full", "sq<sk", "varlen"])
def test_tau_floor_is_a_lower_bound(alpha, layout):
    """The max pass's tau floor (tau of the keys of the two nearest key tiles) lies below the
    float64 tau on every row, and on causal rows it exists and is close to tau
    wherever those tiles hold every key the row sees (three Newton steps: a few hundredths)."""
    sq, sk = {"sq<sk": (100, 300)}.get(layout, (260, 260))
    q, k, v = (t.detach() for t in random_qkv(1, sq, sk, 4, 2, 32, amp=1.5, seed=5))
    if layout == "varlen":
        cu = torch.tensor([0, 90, 200, 260])
        vis = varlen_visibility(cu, cu, True)
    else:
        vis = causal_visibility(sq, sk, layout != "full", "cpu")
    scale = 32 ** -0.5
    floor = (alpha - 1) * scale * tb.max_pass(problem(tb, q, k, vis, (alpha - 1) * scale, alpha)).tau_floor
    _, tau = entmax_attention_reference(q, k, v, alpha, visibility=vis, return_tau=True)
    assert (floor.double() <= tau).all()
    if layout != "full":
        # varlen: rows of a document that ends inside their query tile may see no key there
        assert torch.isfinite(floor).all() or (layout == "varlen" and torch.isfinite(floor).float().mean() > 0.7)
        _, hi = key_tile_span(vis, 64, 64)
        near = torch.arange(sk)[None, :] // 64 >= (hi[torch.arange(sq) // 64] - 2)[:, None]
        covered = ~(vis.dense() & ~near).any(-1)  # rows that see no key outside the two nearest tiles
        assert covered[:128].all() or layout != "causal"
        gap = (tau - floor.double())[..., covered]
        assert (gap <= 0.1).all() and (gap.numel() == 0 or gap.mean() < 0.01)


def _position_coded_qkv(seqlen, dim, amp=2.0, seed=3):
    """q, k = amp * P + unit noise with P a sinusoidal position code (the benchmarks' inputs)."""
    freqs = 4096.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(seqlen, dtype=torch.float64)[:, None] * freqs
    code = amp * torch.cat([angles.cos(), angles.sin()], -1).float()[None, :, None]
    g = torch.Generator().manual_seed(seed)
    return [code * (i < 2) + torch.randn(1, seqlen, 2, dim, generator=g) for i in range(3)]


def test_tau_floor_narrows_the_histogram():
    """With keys and queries sharing a position code plus unit noise (the benchmarks' inputs), the
    floor keeps the histogram pass off tiles the max-based test admits, and tau stays exact."""
    seqlen, dim = 1024, 64
    q, k, v = _position_coded_qkv(seqlen, dim)
    vis = causal_visibility(seqlen, seqlen, True, "cpu")
    prob = problem(tb, q, k, vis, 0.5 * dim ** -0.5)
    by_max = S.histogram_mask(tb.max_pass(prob, tau_floor=no_floor(prob)).gap_codes)  # no floor
    by_floor = S.histogram_mask(tb.max_pass(prob).gap_codes)
    assert not (by_floor & ~by_max).any() and by_floor.sum() < 0.9 * by_max.sum()
    fwd = entmax_forward(tb, q, SingleBlock(k, v, vis), EntmaxSpec(1.5), dim ** -0.5)
    _, tau = entmax_attention_reference(q, k, v, 1.5, True, return_tau=True)
    assert ((fwd.absolute_tau(0.5 * dim ** -0.5) - tau).abs() / tau.abs().clamp(min=1.0)).max() < 1e-5


def test_histogram_above_the_tau_floor_is_complete():
    """With a tau floor the coarse histogram fills only the bins from the max's down to the
    floor's (``stats.kept_bins``), and those exactly as the full histogram of every tile does."""
    q, k, _ = _position_coded_qkv(512, 64)
    vis = causal_visibility(512, 512, True, "cpu")
    scale_z = 0.5 * 64 ** -0.5
    maxima = tb.max_pass(problem(tb, q, k, vis, scale_z))
    row_max, tau_floor = S.relative(maxima.score_max, maxima.tau_floor, scale_z)[1:3]
    prob, codes = problem(tb, q, k, vis, scale_z, shift=maxima.score_max), maxima.gap_codes
    every = codes != S.GAP_NONE
    full, _ = tb.histogram_pass(prob, row_max, None, codes, prob.block_mask(every))
    cut, _ = tb.histogram_pass(prob, row_max, tau_floor, codes, prob.block_mask(S.histogram_mask(codes)))
    kept = torch.arange(S.NUM_BINS) < S.kept_bins(row_max, tau_floor)[..., None]
    assert (~kept).any(-1).float().mean() > 0.4  # many rows need fewer than all bins
    assert torch.equal(cut[kept], full[kept]) and full[kept].sum() > 0
    assert (cut[~kept] == 0).all()


def test_shard_statistics_add_up_in_any_order():
    """Against the score max over all shards (what the forward takes), the counts of key shards add
    up to the counts of the whole in any order, exactly; the refinement sums of the shards, taken
    at the merged bracket, add up to tau of the whole (alpha 1.5 and 2)."""
    q, k, _ = (t.detach() for t in random_qkv(1, 64, 320, 2, 2, 32, amp=2.5, seed=13))
    whole_vis = causal_visibility(64, 320, False, "cpu")
    cuts = [0, 64, 128, 192, 256, 320]
    shards = [(k[:, a:b], whole_vis.with_keys(whole_vis.k_pos[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]
    rng = random.Random(0)
    for alpha in (1.5, 2.0):
        scale_z = (alpha - 1.0) * 32 ** -0.5
        whole, _, rel = statistics_pass(tb, q, k, whole_vis, scale_z)
        shard_maxima = [tb.max_pass(problem(tb, q, ks, vis, scale_z)).score_max for ks, vis in shards]
        assert torch.equal(torch.stack(shard_maxima).amax(0), rel.shift)
        parts = [statistics_pass(tb, q, ks, vis, scale_z, score_max=rel.shift)[0] for ks, vis in shards]
        every = torch.ones(1, 2, 1, 1, dtype=torch.bool)
        _, tau = entmax_attention_reference(q.double(), k.double(), k.double(), alpha, False, return_tau=True)
        for _ in range(3):
            order = list(range(len(parts)))
            rng.shuffle(order)
            hist = sum(parts[i].hist for i in order)
            assert torch.equal(hist, whole.hist) and whole.hist.sum() > 0  # counts: exact
            bracket = S.coarse_bracket(S.RowStats(whole.row_max, hist), EntmaxSpec(alpha))
            shard_problems = [problem(tb, q, shards[i][0], shards[i][1], scale_z, alpha, shift=rel.shift)
                              for i in order]
            sums = sum(tb.fine_histogram_pass(prob, prob.block_mask(every), bracket.bin_index)[0]
                       for prob in shard_problems)
            merged_tau = S.fine_tau(bracket, sums, EntmaxSpec(alpha)).double() + scale_z * rel.shift.double()
            assert ((merged_tau - tau).abs() / tau.abs().clamp(min=1.0)).max() < 1e-5


def test_block_mask_never_drops_a_nonzero_tile():
    # Local attention: strong positional signal makes most tiles exactly zero.
    seqlen, dim = 512, 32
    q, k, v = _local_qkv(seqlen, dim)
    vis = causal_visibility(seqlen, seqlen, True, "cpu")
    fwd = entmax_forward(tb, q, SingleBlock(k, v, vis), EntmaxSpec(1.5), dim ** -0.5)
    _, tau = entmax_attention_reference(q, k, v, 1.5, True, return_tau=True)
    z = 0.5 * dim ** -0.5 * torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    truly_nonzero = (z > tau[..., None]) & vis.dense()
    tiles = truly_nonzero.view(1, 2, 8, 64, 8, 64).any(-1).any(-2)
    assert not (tiles & ~fwd.read_masks[0].tiles).any(), "a tile with nonzero probability was masked out"
    assert torch.equal(tiles, fwd.block_masks[0].tiles)
    mask = fwd.block_masks[0]
    assert mask.sparsity() > 0.5
    assert mask.to_dense().shape == (1, 2, seqlen, seqlen)
    assert "sparsity=" in repr(mask)


def test_block_mask_from_bits_reads_as_the_bools():
    """A mask held as bits (``BlockMask.from_bits``) answers every question the bool mask does
    (counts, sparsity, needed key tiles, the dense mask), and holds an eighth of the bytes; key
    tile counts that are not a multiple of 8 included."""
    from ring_adasplash.kernels.block_mask import BlockMask, pack_tiles

    gen = torch.Generator().manual_seed(5)
    for num_k_tiles in (8, 13):
        tiles = torch.rand(2, 3, 7, num_k_tiles, generator=gen) < 0.3
        tiles[..., num_k_tiles - 1] = False
        tiles[1, 2, 4, num_k_tiles - 1] = True  # the last key tile, needed by one tile only
        tiles[..., 2] = False  # a key tile nothing needs
        visible = torch.ones(7, num_k_tiles, dtype=torch.bool).tril(4)
        for vis in (None, visible):
            bools = BlockMask(tiles, 16, 16, 100, 16 * num_k_tiles - 5, vis)
            bits = BlockMask.from_bits(pack_tiles(tiles), num_k_tiles, 16, 16, 100, 16 * num_k_tiles - 5, vis)
            assert bits.nonzero_tiles() == bools.nonzero_tiles() > 0
            assert bits.visible_tiles() == bools.visible_tiles() and bits.sparsity() == bools.sparsity()
            assert bits.shape == bools.shape
            assert torch.equal(bits.needed_key_tiles(), bools.needed_key_tiles())
            assert not bits.needed_key_tiles()[2] and bits.needed_key_tiles()[num_k_tiles - 1]
            assert torch.equal(bits.tiles, tiles) and torch.equal(bits.to_dense(), bools.to_dense())
            assert "as bits" in repr(bits) and "as bits" not in repr(bools)
            assert bits.held_tensors()[0].numel() * 8 < bools.held_tensors()[0].numel() + 8 * 2 * 3 * 7
    with pytest.raises(ValueError, match="bits must be"):
        BlockMask.from_bits(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), 17, 16, 16, 32, 272)


def test_non_contiguous_inputs():
    q, k, v = random_qkv(1, 96, 96, 4, 2, 32, seed=17)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not qt.is_contiguous()
    check_against_reference(qt, k, v, 1.5, True, tol=1e-4)


@settings(max_examples=12, deadline=None)
@given(sq=st.integers(1, 140), sk=st.integers(1, 140), heads_kv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 3]), dim=st.sampled_from([8, 16, 48]), alpha=st.sampled_from(ALPHAS),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_property_random_shapes(sq, sk, heads_kv, group, dim, alpha, causal, seed):
    q, k, v = random_qkv(1, sq, sk, heads_kv * group, heads_kv, dim, seed=seed)
    out = ra.adasplash_func(q, k, v, alpha=alpha, causal=causal)
    ref = entmax_attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), alpha, causal)
    if ref.norm() > 0:
        assert rel_err(out, ref) < 1e-4
    else:
        assert out.abs().max() == 0


def test_entmax_bisect_sums_to_one():
    z = torch.randn(5, 40, dtype=torch.float64) * 3
    for alpha in ALPHAS:
        p, _ = entmax_bisect(z, alpha, torch.ones_like(z, dtype=torch.bool))
        torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=torch.float64))
        assert (p == 0).any()


def test_module_wrapper():
    q, k, v = random_qkv(1, 40, 40, 2, 2, 16, seed=19)
    module = ra.AdaSplashAttention(alpha=2.0, causal=False)
    assert "alpha=2.0" in repr(module)
    torch.testing.assert_close(module(q, k, v), ra.adasplash_func(q, k, v, alpha=2.0, causal=False))


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: ra.adasplash_func(q[0], k, v), "q must have shape"),
    (lambda q, k, v: ra.adasplash_func(q, k, v, alpha=1.0), "alpha must be in (1, 2]"),
    (lambda q, k, v: ra.adasplash_func(q, k, v, alpha=2.5), "alpha must be in (1, 2]"),
    (lambda q, k, v: ra.adasplash_func(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)),
     "multiple of heads"),
    (lambda q, k, v: ra.adasplash_func(q, k.double(), v), "share a dtype"),
    (lambda q, k, v: ra.adasplash_func(q, k, v[..., :8]), "same shape"),
    (lambda q, k, v: ra.adasplash_func(q.int(), k, v), "must be float16"),
    (lambda q, k, v: ra.adasplash_func(q, k, v, softmax_scale=-1.0), "softmax_scale must be positive"),
    (lambda q, k, v: ra.adasplash_varlen_func(q[0], k[0], v[0], torch.tensor([0, 5, 3, 16]),
                                              torch.tensor([0, 8, 12, 16]), 16, 16), "cu_seqlens_q must start at 0"),
    (lambda q, k, v: ra.adasplash_varlen_func(q[0], k[0], v[0], torch.tensor([0, 16]), torch.tensor([0, 8, 16]),
                                              16, 16), "same number of sequences"),
    (lambda q, k, v: ra.adasplash_varlen_func(q[0], k[0], v[0], torch.tensor([0, 16]), torch.tensor([0, 16]),
                                              4, 16), "max_seqlen_q"),
])
def test_bad_input_names_the_argument(call, message):
    q, k, v = (t.detach() for t in random_qkv(1, 16, 16, 4, 2, 16))
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        call(q, k, v)


@pytest.mark.parametrize("env, bad, message, good", [
    ("RING_ADASPLASH_CUDA_GRAPHS", "sometimes", "must be one of auto, on, off", ("off", "on", "auto")),
    ("RING_ADASPLASH_COMPILE_AHEAD", "yes", "must be 0 or 1", ("0", "1")),
])
def test_settings_are_checked(monkeypatch, env, bad, message, good):
    """A bad value of a setting is an error naming the variable and its values, on every device;
    valid values leave CPU results as they were (CUDA graphs and compiling ahead are for the Triton
    kernels on CUDA: no graph is captured, though each call is made three times, and a second
    sight would capture on CUDA)."""
    from ring_adasplash import cuda_graphs

    q, k, v = random_qkv(1, 40, 40, 2, 2, 16)
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=f"{env} {message}"):
        ra.adasplash_func(q, k, v)
    results = []
    for value in good:
        monkeypatch.setenv(env, value)
        results.append([ra.adasplash_func(q, k, v) for _ in range(3)])
    for per_value in results[1:]:
        for a, b in zip(results[0], per_value):
            assert torch.equal(a, b)
    assert not cuda_graphs._graphs


def _calls_in_query_chunks(monkeypatch, chunk_tiles, call):
    """``call()``'s output and gradients of q, k, v with ``functional.CHUNK_TILES`` at ``chunk_tiles``."""
    from ring_adasplash import functional

    monkeypatch.setattr(functional, "CHUNK_TILES", chunk_tiles)
    return call()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_long_calls_take_their_queries_in_chunks_with_the_same_results(alpha, monkeypatch):
    """A call whose tile maps would exceed ``functional.CHUNK_TILES`` runs its forward in chunks of
    queries (``algorithm.entmax_forward_in_query_chunks``): the output, the statistics and the
    gradients are those of one forward, bit for bit, through causal and windowed rows with sinks,
    left padding, packed documents and GQA, with chunks of one and of two query tiles (the last
    one short)."""
    q, k, v, grad_out = random_qkv(2, 300, 300, 4, 2, 16, seed=31, grad_out=True)
    padding = torch.ones(2, 300, dtype=torch.bool)
    padding[1, :45] = False
    position_ids = torch.cat((torch.arange(130), torch.arange(170)))[None].expand(2, 300)
    calls = {
        "causal": dict(causal=True),
        "window and sinks": dict(causal=True, window_size=(70, 0), sink_tokens=3),
        "padding": dict(causal=True, key_padding_mask=padding),
        "packed": dict(causal=True, position_ids=position_ids),
    }
    tiles_per_query_tile = 2 * 4 * 5  # batch x heads x key tiles

    def run(kwargs):
        qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, stats = ra.adasplash_func(qa, ka, va, alpha=alpha, return_stats=True, **kwargs)
        out.backward(grad_out)
        return (out, *stats, qa.grad, ka.grad, va.grad)

    for name, kwargs in calls.items():
        whole = _calls_in_query_chunks(monkeypatch, 1 << 40, functools.partial(run, kwargs))
        for query_tiles in (1, 2):
            chunked = _calls_in_query_chunks(monkeypatch, query_tiles * tiles_per_query_tile,
                                             functools.partial(run, kwargs))
            for a, b in zip(whole, chunked):
                assert torch.equal(a, b), (name, query_tiles)
        assert torch.isfinite(whole[0]).all() and whole[0].abs().sum() > 0, name


def test_chunked_forwards_hold_the_tile_state_of_one_chunk(monkeypatch):
    """In chunks of queries a forward's per-tile state is that of its largest chunk: with chunks
    of two query tiles out of ten, a fifth of the whole call's (telemetry); the nonzero tiles it
    keeps for the backward are the whole call's."""
    from ring_adasplash import functional, telemetry

    q, k, v = (torch.randn(2, 640, 3, 16) for _ in range(3))
    counts = []
    for chunk_tiles in (1 << 40, 2 * (2 * 3 * 10)):
        monkeypatch.setattr(functional, "CHUNK_TILES", chunk_tiles)
        with telemetry.record() as t:
            ra.adasplash_func(q, k, v, causal=True)
        counts.append((t.tile_state_bytes, t.block_masks[0].tiles.clone(), t.visible_tiles, t.nonzero_tiles))
    (whole_state, whole_tiles, *whole_counts), (chunk_state, chunk_tiles, *chunk_counts) = counts
    n_tiles = 10
    per_head, once = 2 * 3 * n_tiles * n_tiles, n_tiles * n_tiles
    # as test_telemetry_counts_the_per_tile_state counts it
    assert whole_state == 3 * per_head + once
    assert chunk_state == (3 * per_head + once) // 5
    assert torch.equal(whole_tiles, chunk_tiles) and whole_counts == chunk_counts


@pytest.mark.parametrize("num_key_tiles", (1, 7, 8, 13, 64))
def test_tiles_kept_for_the_backward_are_bits(num_key_tiles, monkeypatch):
    """``pack_tiles`` keeps a tile in a bit (8 key tiles to a byte, the last byte padded) and
    ``unpack_tiles`` gives the mask back; a forward keeps its nonzero tiles so for the backward:
    what it saves is an eighth of the bool mask (``ceil(nK / 8)`` bytes per query tile and head)."""
    from ring_adasplash import functional
    from ring_adasplash.kernels.block_mask import pack_tiles, unpack_tiles

    tiles = torch.rand(2, 3, 5, num_key_tiles, generator=torch.Generator().manual_seed(num_key_tiles)) < 0.4
    packed = pack_tiles(tiles)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, -(-num_key_tiles // 8))
    assert torch.equal(unpack_tiles(packed, num_key_tiles), tiles)
    with pytest.raises(ValueError, match="packed must be uint8"):
        unpack_tiles(packed, num_key_tiles + 8)
    saved = []
    forward = functional.attention_forward

    def spy(*args, **kwargs):
        results = forward(*args, **kwargs)
        saved.append(results[6])  # the nonzero tiles, as bits
        return results

    monkeypatch.setattr(functional, "attention_forward", spy)
    q, k, v = random_qkv(1, 200, 64 * num_key_tiles, 2, 2, 16, seed=3)
    ra.adasplash_func(q, k, v, causal=False).sum().backward()
    assert saved[0].dtype == torch.uint8 and saved[0].shape == (1, 2, 4, -(-num_key_tiles // 8))
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_query_chunks_must_be_whole_query_tiles():
    from ring_adasplash.kernels import algorithm as A
    from ring_adasplash.kernels import backend_for

    q, k, v = (torch.randn(1, 100, 2, 16) for _ in range(3))
    vis = causal_visibility(100, 100, True, "cpu")
    with pytest.raises(ValueError, match="chunk_rows must be a positive multiple of 64"):
        A.entmax_forward_in_query_chunks(backend_for(q), q, k, v, vis, EntmaxSpec(1.5), 0.25, 100)


@pytest.mark.parametrize("seqlen", (640, 1024))
def test_telemetry_counts_the_per_tile_state(seqlen):
    """``tile_state_bytes`` and ``saved_tile_bytes`` are the storages a forward holds (PyTorch
    backend, one device, causal, the Newton schedule): per (query tile, key tile, head) a tile
    gap's one-byte code (``stats.encode_gaps``) and two bool masks (the tiles the schedule read,
    the output pass's candidates) plus the visible tiles once (the visibility rule's, shared by
    every batch entry and head); kept for the backward: the tiles with p > 0, as bits
    (``block_mask.pack_tiles``)."""
    from ring_adasplash import telemetry

    q, k, v = (torch.randn(2, seqlen, 3, 16) for _ in range(3))
    with telemetry.record() as t:
        ra.adasplash_func(q, k, v, causal=True)
    n_tiles = -(-seqlen // 64)
    per_head, once = 2 * 3 * n_tiles * n_tiles, n_tiles * n_tiles
    assert (t.tile_state_bytes, t.saved_tile_bytes) == (3 * per_head + once, 2 * 3 * n_tiles * -(-n_tiles // 8))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_forward_without_backward_leaves_out_the_backward_sums(alpha, monkeypatch):
    """Under ``no_grad``, or with no input that requires grad, the forward computes no ``out_u``
    or ``u_sum`` (the output pass's product ``u v``, read only by the backward); with one that
    requires grad (alpha included) it does. The output and the row statistics are the same."""
    q, k, v = random_qkv(2, 150, 150, 4, 2, 16, seed=11, requires_grad=False)
    backend = ra.kernels.backend_for(q)  # the PyTorch backend, or the Triton kernels where selected
    seen = []
    output_pass = backend.output_pass

    def spy(problem, tau, tiles, backward_sums=True, out_dtype=None, partial=None):
        sums = output_pass(problem, tau, tiles, backward_sums, out_dtype, partial=partial)
        seen.append(sums.out_u is not None)
        assert (sums.out_u is None) == (sums.u_sum is None) == (not backward_sums)
        return sums

    monkeypatch.setattr(backend, "output_pass", spy)
    with torch.no_grad():
        no_grad, stats = ra.adasplash_func(q, k, v, alpha=alpha, return_stats=True)
    plain = ra.adasplash_func(q, k, v, alpha=alpha)  # grad enabled, nothing requires it
    assert seen == [False, False]
    leaf = torch.tensor(alpha, requires_grad=True)
    learnable, _ = ra.adasplash_func(q, k, v, alpha=leaf, return_stats=True)
    qg = q.clone().requires_grad_()
    trained, trained_stats = ra.adasplash_func(qg, k, v, alpha=alpha, return_stats=True)
    assert seen == [False, False, True, True]
    for out in (plain, trained):
        assert torch.equal(no_grad, out.detach())
    # alpha read back from a float32 tensor (1.3 is not one)
    torch.testing.assert_close(learnable.detach(), no_grad, rtol=1e-5, atol=1e-5)
    for got, want in zip(stats, trained_stats):
        assert torch.equal(got, want)
    trained.sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_gap_codes_keep_every_tile_a_float_gap_keeps():
    """``stats.encode_gaps`` and ``code_threshold``: for thresholds in the range the masks use
    (``histogram_mask``'s to 1), a code test keeps every tile the float gap would, and drops every
    tile whose gap lies more than a step (plus rounding) below; -inf (no visible pair) codes 0 and
    is never kept; NaN and gaps above GAP_HIGH are kept by every finite threshold; +inf keeps none."""
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        gaps = (1.3 * torch.rand(100_000, generator=g, dtype=torch.float64) - 0.2).to(dtype)
        gaps[:3] = torch.tensor([float("-inf"), float("nan"), torch.finfo(torch.float32).min], dtype=dtype)
        codes = S.encode_gaps(gaps)
        assert codes.dtype == torch.uint8 and codes[0] == S.GAP_NONE and codes[1] == S.GAP_ABOVE
        assert codes[2] == S.GAP_ZERO
        assert torch.equal(S.histogram_mask(codes)[3:], gaps[3:] > S.GAP_LOW)
        bounds = torch.cat((torch.tensor([-S.MASK_MARGIN, 0.0, 1.0 - S.MASK_MARGIN]),
                            torch.rand(300, generator=g) * 1.0001 - S.MASK_MARGIN)).to(dtype)
        for bound in bounds:
            kept = codes > S.code_threshold(bound)
            assert not kept[0] and kept[1]
            assert not ((gaps > bound) & ~kept).any(), bound
            assert not (kept[3:] & (gaps[3:] <= bound - 1.01 * S.GAP_STEP)).any(), bound
        assert not (codes > S.code_threshold(torch.tensor(float("inf"), dtype=dtype))).any()
