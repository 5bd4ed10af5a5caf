"""The AdaSplash drop-in (``ring_adasplash.adasplash``): AdaSplash's layout (batch, heads, seqlen,
head_dim), its defaults and its ``varlen`` (valid lengths per batch entry, padded rows zero),
against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from ring_adasplash.adasplash_compat import adasplash
from ring_adasplash.reference import entmax_attention_reference


def _bhsd(batch, heads, heads_kv, seqlen, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, heads, seqlen, dim, generator=g)
    k = 2 * torch.randn(batch, heads_kv, seqlen, dim, generator=g)
    v = torch.randn(batch, heads_kv, seqlen, dim, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("is_causal", (True, False))
@pytest.mark.parametrize("alpha", (1.5, 2.0, 1.25))
def test_dropin_matches_the_reference_in_adasplash_layout(alpha, is_causal):
    q, k, v = _bhsd(2, 4, 2, 70, 16, seed=1)
    out = adasplash(q, k, v, alpha=alpha, is_causal=is_causal, niter=10)
    ref = entmax_attention_reference(*(t.double().transpose(1, 2) for t in (q, k, v)), alpha, is_causal)
    assert out.shape == q.shape
    assert rel_err(out, ref.transpose(1, 2)) < 1e-5


@pytest.mark.parametrize("is_causal", (True, False))
def test_varlen_uses_each_entry_prefix_and_zeroes_padding(is_causal):
    q, k, v = _bhsd(3, 2, 2, 50, 16, seed=2)
    lengths = torch.tensor([50, 17, 1])
    out = adasplash(q, k, v, alpha=1.5, is_causal=is_causal, varlen=lengths)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for b, length in enumerate(lengths.tolist()):
        qd, kd, vd = (t[b:b + 1, :, :length].detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
        ref = entmax_attention_reference(qd, kd, vd, 1.5, is_causal)
        ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out[b:b + 1, :, :length].double().transpose(1, 2))
        assert rel_err(out[b:b + 1, :, :length], ref.transpose(1, 2)) < 1e-5
        for got, want in zip(grads, ref_grads):  # absolute: a one-token entry has dq = 0 exactly
            want = want.transpose(1, 2)
            assert (got[b:b + 1, :, :length] - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())
        assert (out[b, :, length:] == 0).all()
        assert all((g[b, :, length:] == 0).all() for g in grads)  # padding gets no gradient


def test_defaults_are_adasplash_defaults():
    q, k, v = _bhsd(1, 2, 2, 40, 16, seed=3)
    causal = entmax_attention_reference(*(t.double().transpose(1, 2) for t in (q, k, v)), 1.5, True)
    assert rel_err(adasplash(q, k, v), causal.transpose(1, 2)) < 1e-5  # alpha 1.5, causal


def test_bad_arguments_name_themselves():
    q, k, v = _bhsd(2, 2, 2, 16, 16, seed=4)
    with pytest.raises(ValueError, match="varlen"):
        adasplash(q, k, v, varlen=torch.tensor([3]))
    with pytest.raises(ValueError, match="varlen"):
        adasplash(q, k, v, varlen=torch.tensor([3, 17]))
    with pytest.raises(ValueError, match="niter"):
        adasplash(q, k, v, niter=0)
    with pytest.raises(ValueError, match="seqlen"):
        adasplash(q, k[:, :, :8], v[:, :, :8])
    with pytest.raises(ValueError, match="4-dim"):
        adasplash(q[0], k, v)
