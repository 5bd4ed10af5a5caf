"""Masks beyond causal and packed documents: ``key_padding_mask`` of ``adasplash_func``, against the
float64 dense reference with the explicit mask, entry by entry (forward and gradients)."""
from __future__ import annotations

import pytest
import torch
from helpers import random_qkv, reference_with_grads, rel_err

import ring_adasplash as ra
from ring_adasplash.kernels.visibility import Visibility, causal_visibility


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
        assert rel_err(got, want) < 1e-4, (name, rel_err(got, want))
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
