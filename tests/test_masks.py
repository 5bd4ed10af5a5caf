"""Masks beyond causal and packed documents: ``key_padding_mask`` of ``adasplash_func``, against the
float64 dense reference with the explicit mask, entry by entry (forward and gradients)."""
from __future__ import annotations

import pytest
import torch
from helpers import random_qkv, reference_with_grads, rel_err

import ring_adasplash as ra
from ring_adasplash.kernels.visibility import NO_LIMIT, Visibility, causal_visibility, keys_seen_by


def _close(got, want) -> bool:
    """Relative 1e-4, or absolute 1e-5 where the reference is zero (one visible key: dq = 0, which
    float32 reaches as g - delta, two roundings of the same product)."""
    return rel_err(got, want) < 1e-4 or (got - want).abs().max().item() < 1e-5


def _padding(kind: str, batch: int, seqlen: int) -> torch.Tensor:
    """(batch, seqlen) bool, True = kept: left or right padding of a different length per entry,
    random holes, or one entry padded whole."""
    lengths = torch.tensor([seqlen, seqlen - 37, seqlen - 90][:batch])
    pos = torch.arange(seqlen)
    if kind == "right":
        return pos[None, :] < lengths[:, None]
    if kind == "left":
        return pos[None, :] >= (seqlen - lengths)[:, None]
    if kind == "holes":
        return torch.rand(batch, seqlen, generator=torch.Generator().manual_seed(4)) < 0.7
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    mask[1] = False
    return mask


def _reference(q, k, v, grad_out, mask, alpha, causal):
    """The float64 reference of each batch entry with its kept keys as the visible ones."""
    outs = []
    for b in range(q.shape[0]):
        base = causal_visibility(q.shape[1], k.shape[1], causal, "cpu")
        vis = Visibility(base.q_limit, base.q_doc, base.k_pos, torch.where(mask[b], 0, -1).to(torch.int32))
        entry = [t[b:b + 1] for t in (q, k, v, grad_out)]
        outs.append(reference_with_grads(*entry, alpha, causal, visibility=vis))
    return [torch.cat(parts) for parts in zip(*outs)]


@pytest.mark.parametrize("kind", ["left", "right", "holes", "empty entry"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alpha", [1.5, 1.25])
def test_key_padding_matches_the_masked_reference(kind, causal, alpha):
    q, k, v, grad_out = random_qkv(3, 150, 150, 4, 2, 32, seed=8, grad_out=True, requires_grad=True)
    mask = _padding(kind, 3, 150)
    out = ra.adasplash_func(q, k, v, alpha=alpha, causal=causal, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = _reference(q.detach(), k.detach(), v.detach(), grad_out, mask, alpha, causal)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert _close(got, want), (name, rel_err(got, want))
    # padded keys get no gradient; a query that sees no kept key gets a zero row
    assert (grads[1].abs().sum(-1)[~mask].amax() if (~mask).any() else 0) == 0
    if kind == "empty entry":
        assert (out[1] == 0).all()


def test_key_padding_float64_to_rounding():
    q, k, v, grad_out = random_qkv(2, 90, 130, 2, 2, 16, seed=9, grad_out=True, dtype=torch.float64,
                                   requires_grad=True)
    mask = _padding("left", 2, 130)
    out = ra.adasplash_func(q, k, v, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = _reference(q.detach(), k.detach(), v.detach(), grad_out, mask, 1.5, True)
    for got, want in zip((out, *grads), ref):
        assert (got - want).abs().max().item() < 1e-9


def test_padding_tiles_are_never_read():
    """An entry whose second half is padding: no query tile has a visible pair in those key tiles."""
    q, k, v = random_qkv(2, 256, 256, 2, 2, 16, seed=10)
    mask = torch.ones(2, 256, dtype=torch.bool)
    mask[1, 128:] = False
    with ra.telemetry.record() as t:
        ra.adasplash_func(q, k, v, causal=False, key_padding_mask=mask)
    # (nQ, nK) over the two entries side by side: entry 1's queries see its first two key tiles only
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    expected[4:, 4:6] = True
    assert torch.equal(t.block_masks[0].visible, expected)


def test_key_padding_mask_errors():
    q = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seqlen_k\) = \(2, 8\)"):
        ra.adasplash_func(q, q, q, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        ra.adasplash_func(q, q, q, key_padding_mask=torch.ones(2, 8))


def explicit_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size=(-1, -1), sink_tokens: int = 0,
                  kept: torch.Tensor | None = None) -> torch.Tensor:
    """(Sq, Sk) bool written out from the definitions: query i sees key j when j is kept, under
    causal ``j <= i + Sk - Sq``, ``j <= i + Sk - Sq + right`` and ``j >= i + Sk - Sq - left`` (-1:
    no bound) unless j is among the first ``sink_tokens`` kept keys."""
    centre = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    j = torch.arange(seqlen_k)[None, :]
    kept = torch.ones(seqlen_k, dtype=torch.bool) if kept is None else kept
    sink = (kept.cumsum(0) <= sink_tokens) & kept
    left, right = window_size
    mask = kept[None, :] & ((j <= centre) if causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool))
    if right >= 0:
        mask &= j <= centre + right
    if left >= 0:
        mask &= (j >= centre - left) | sink[None, :]
    return mask


def _masked_reference(q, k, v, grad_out, masks, alpha):
    outs = [reference_with_grads(*(t[b:b + 1] for t in (q, k, v, grad_out)), alpha, False, mask=masks[b])
            for b in range(q.shape[0])]
    return [torch.cat(parts) for parts in zip(*outs)]


WINDOWS = [((16, -1), 0), ((40, 0), 4), ((-1, 10), 0), ((25, 25), 3), ((0, 0), 0)]


@pytest.mark.parametrize("window_size,sink_tokens", WINDOWS)
@pytest.mark.parametrize("causal", [True, False])
def test_window_and_sinks_match_the_masked_reference(window_size, sink_tokens, causal):
    q, k, v, grad_out = random_qkv(2, 150, 170, 4, 2, 32, seed=11, grad_out=True, requires_grad=True)
    out = ra.adasplash_func(q, k, v, causal=causal, window_size=window_size, sink_tokens=sink_tokens)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = explicit_mask(150, 170, causal, window_size, sink_tokens)
    ref = _masked_reference(q.detach(), k.detach(), v.detach(), grad_out, [mask, mask], 1.5)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert _close(got, want), (name, rel_err(got, want))


def test_window_with_padding_and_float64():
    """Left padding, a window and sinks at once (sinks: the first kept keys), float64 to rounding."""
    q, k, v, grad_out = random_qkv(3, 120, 120, 2, 1, 16, seed=12, grad_out=True, dtype=torch.float64,
                                   requires_grad=True)
    kept = _padding("left", 3, 120)
    out = ra.adasplash_func(q, k, v, key_padding_mask=kept, window_size=(30, 0), sink_tokens=2)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    masks = [explicit_mask(120, 120, True, (30, 0), 2, kept[b]) for b in range(3)]
    ref = _masked_reference(q.detach(), k.detach(), v.detach(), grad_out, masks, 1.5)
    for got, want in zip((out, *grads), ref):
        assert (got - want).abs().max().item() < 1e-9


def test_varlen_checks_and_builds_a_packing_once_per_offsets_tensor(monkeypatch):
    """``adasplash_varlen_func`` checks ``cu_seqlens`` and builds their visibility once per pair of
    tensors: a second call with the same tensors reads nothing on the host and passes the same
    visibility vectors (what the launchers' cache and the CUDA graphs key on), with the same
    output; an in-place change builds a new one, whose output matches a fresh tensor's; bad offsets
    raise on every call, and a too small ``max_seqlen_q`` raises on a known packing too. ``pairs``
    (the CUDA-graph policy's work) is the sum of the documents' query x key products."""
    from ring_adasplash import functional as F

    checked, vectors = [], []
    check = F.check_cu_seqlens
    monkeypatch.setattr(F, "check_cu_seqlens", lambda *a: checked.append(a[2]) or check(*a))
    forward = F.attention_forward
    monkeypatch.setattr(F, "attention_forward", lambda *a: vectors.append(a[3:9]) or forward(*a))
    q, k, v = random_qkv(1, 120, 120, 2, 2, 16, seed=21)[:3]
    q, k, v = q[0], k[0], v[0]
    cu = torch.tensor([0, 30, 100, 120], dtype=torch.int32)
    first = ra.adasplash_varlen_func(q, k, v, cu, cu, 70, 70)
    again = ra.adasplash_varlen_func(q, k, v, cu, cu, 70, 70)
    assert checked == ["cu_seqlens_q", "cu_seqlens_k"] and torch.equal(first, again)
    assert all(a is b for a, b in zip(*vectors))
    assert F._packing(cu, cu, 120, 120, True, (-1, -1), 0, q.device).pairs == 30 * 30 + 70 * 70 + 20 * 20
    cu[1] = 50  # in place: documents of 50, 50 and 20
    changed = ra.adasplash_varlen_func(q, k, v, cu, cu, 70, 70)
    assert len(checked) == 4 and not all(a is b for a, b in zip(vectors[1], vectors[2]))
    fresh = torch.tensor([0, 50, 100, 120], dtype=torch.int32)
    assert torch.equal(changed, ra.adasplash_varlen_func(q, k, v, fresh, fresh, 70, 70))
    assert not torch.equal(changed, first)
    bad = torch.tensor([0, 30, 20, 120], dtype=torch.int32)
    for _ in range(2):
        with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease"):
            ra.adasplash_varlen_func(q, k, v, bad, bad, 120, 120)
    with pytest.raises(ValueError, match=r"max_seqlen_q \(40\) is smaller than the longest sequence \(50\)"):
        ra.adasplash_varlen_func(q, k, v, cu, cu, 40, 70)


def test_varlen_window_and_sinks():
    """Packed documents: the window and the sinks apply within each document."""
    q, k, v, grad_out = random_qkv(1, 200, 200, 2, 2, 16, seed=13, grad_out=True, requires_grad=True)
    cu = torch.tensor([0, 70, 75, 200], dtype=torch.int32)
    out = ra.adasplash_varlen_func(q[0], k[0], v[0], cu, cu, 125, 125, window_size=(20, 0), sink_tokens=3)
    grads = torch.autograd.grad(out, (q, k, v), grad_out[0])
    mask = torch.zeros(200, 200, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask[a:b, a:b] = explicit_mask(b - a, b - a, True, (20, 0), 3)
    ref = _masked_reference(q.detach(), k.detach(), v.detach(), grad_out, [mask], 1.5)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out[None], *grads), ref):
        assert _close(got, want), (name, rel_err(got, want))


def test_window_skips_the_tiles_outside_it():
    """Causal, window 64 at 1024 tokens: each query tile sees at most three key tiles (its own,
    the one before and a sink tile), of the 16 a causal row reaches."""
    q, k, v = random_qkv(1, 1024, 1024, 2, 2, 16, seed=14)
    with ra.telemetry.record() as t:
        ra.adasplash_func(q, k, v, window_size=(64, 0), sink_tokens=4)
    visible = t.block_masks[0].visible
    assert visible.sum(1).max() <= 3 and visible[:, 0].all()


def test_window_errors():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="window_size must be"):
        ra.adasplash_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size must be"):
        ra.adasplash_func(q, q, q, window_size=4)
    with pytest.raises(ValueError, match="sink_tokens must be"):
        ra.adasplash_func(q, q, q, sink_tokens=-1)


def test_position_ids_mark_packed_documents():
    """Rows of packed documents marked by positions that restart at 0: the same as the documents
    through ``adasplash_varlen_func``, window and sinks per document included."""
    q, k, v, grad_out = random_qkv(2, 90, 90, 2, 2, 16, seed=16, grad_out=True, requires_grad=True)
    lengths = [[30, 50, 10], [90]]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    options = dict(window_size=(12, 0), sink_tokens=2)
    out = ra.adasplash_func(q, k, v, position_ids=position_ids, **options)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    cu = torch.tensor([0, 30, 80, 90, 180], dtype=torch.int32)
    flat = [t.detach().reshape(180, 2, 16).requires_grad_() for t in (q, k, v)]
    ref = ra.adasplash_varlen_func(*flat, cu, cu, 90, 90, **options)
    ref_grads = torch.autograd.grad(ref, flat, grad_out.reshape(180, 2, 16))
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert (got.reshape(want.shape) - want).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="position_ids must be"):
        ra.adasplash_func(q, k, v, position_ids=position_ids[:, :50])


def test_return_stats():
    """tau (relative to the score max), the score max and the support size per row, as the
    float64 reference has them; the padded path's stats come back per batch entry."""
    from ring_adasplash.reference import entmax_attention_reference

    q, k, v = random_qkv(2, 70, 70, 4, 2, 16, seed=17, dtype=torch.float64)
    out, stats = ra.adasplash_func(q, k, v, return_stats=True)
    assert isinstance(stats, ra.AttentionStats) and stats.tau.shape == (2, 4, 70)
    scale_z = 0.5 * 16 ** -0.5
    _, ref_tau = entmax_attention_reference(q, k, v, 1.5, True, return_tau=True)
    assert (stats.tau + scale_z * stats.score_max - ref_tau).abs().max().item() < 1e-9
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2))
    causal = torch.ones(70, 70, dtype=torch.bool).tril()
    assert torch.equal(stats.score_max, scores.masked_fill(~causal, float("-inf")).amax(-1))
    z = scale_z * (scores - stats.score_max[..., None])
    assert torch.equal(stats.support, ((z > stats.tau[..., None]) & causal).sum(-1).double())
    keep = torch.ones(2, 70, dtype=torch.bool)
    keep[1, :10] = False
    _, padded = ra.adasplash_func(q, k, v, key_padding_mask=keep, return_stats=True)
    assert torch.equal(padded.support[0], stats.support[0]) and torch.isinf(padded.tau[1, :, :10]).all()


@pytest.mark.parametrize("group", [1, 2])
def test_keys_seen_by_is_the_dense_rule(group):
    """``keys_seen_by`` (the keys that marked rows see, per key head) equals the dense visibility
    matrix's answer on random rules: arbitrary document ids (negative ones too), windows, sinks,
    rows whose window lies past their limit, marked rows from few to most."""
    g = torch.Generator().manual_seed(group)
    for trial in range(200):
        seqlen_q, seqlen_k = (int(n) for n in torch.randint(1, 40, (2,), generator=g))
        docs = int(torch.randint(1, 4, (1,), generator=g))
        k_pos = torch.randint(0, 50, (seqlen_k,), generator=g).int()
        q_first = torch.randint(-5, 50, (seqlen_q,), generator=g).int()
        k_win_pos = k_pos.clone()
        k_win_pos[torch.rand(seqlen_k, generator=g) < 0.2] = NO_LIMIT
        vis = Visibility(torch.randint(-2, 55, (seqlen_q,), generator=g).int(),
                         7 * torch.randint(-3, docs, (seqlen_q,), generator=g).int(), k_pos,
                         7 * torch.randint(-3, docs, (seqlen_k,), generator=g).int(),
                         None if trial % 3 == 0 else q_first, k_win_pos)
        rows = torch.rand(2, 2 * group, seqlen_q, generator=g) < (0.1, 0.5, 0.9)[trial % 3]
        want = (rows[..., None] & vis.dense()).any(2).view(2, 2, group, seqlen_k).any(2).transpose(1, 2)
        assert torch.equal(keys_seen_by(rows, vis, 2), want), trial
