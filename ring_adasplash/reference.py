"""Dense float64 reference of alpha-entmax attention, for tests and documentation.

O(Sq * Sk) memory: small inputs only. tau is found by bisection, which needs nothing but the
definition ``sum_j [z_j - tau]_+ ** (1 / (alpha - 1)) = 1``, so it checks every fast path.
"""
from __future__ import annotations

import math

import torch

from .kernels.visibility import Visibility, causal_visibility


def entmax_bisect(z: torch.Tensor, alpha: float, visible: torch.Tensor, iters: int = 100):
    """Row-wise entmax of logits ``z = (alpha - 1) * scores`` over ``visible`` entries (last dim).

    Returns ``(p, tau)``; rows with no visible entry give ``p = 0`` and ``tau = +inf``.
    """
    gamma = 1.0 / (alpha - 1.0)
    z = torch.where(visible, z, torch.full_like(z, float("-inf")))
    top = z.amax(-1, keepdim=True)
    empty = ~torch.isfinite(top)
    top = torch.where(empty, torch.zeros_like(top), top)
    lo, hi = top - 1.0, top.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        mass = ((z - mid).clamp(min=0) ** gamma).sum(-1, keepdim=True)
        lo = torch.where(mass >= 1.0, mid, lo)
        hi = torch.where(mass >= 1.0, hi, mid)
    tau = 0.5 * (lo + hi)
    p = (z - tau).clamp(min=0) ** gamma
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-300)  # removes the bisection residual
    p = torch.where(empty, torch.zeros_like(p), p)
    tau = torch.where(empty, torch.full_like(tau, float("inf")), tau)
    return p, tau.squeeze(-1)


def entmax_attention_reference(q, k, v, alpha=1.5, causal=True, softmax_scale=None, visibility: Visibility = None,
                               return_tau=False, mask=None):
    """float64 entmax attention. q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) -> (B, Sq, Hq, D).

    Differentiable (autograd through the bisection's final ``p``, which is exact given tau).
    ``visibility`` overrides ``causal`` (varlen and sharded layouts); ``mask`` (Sq, Sk) bool, True
    = visible, overrides both.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    if visibility is None:
        visibility = causal_visibility(seqlen_q, seqlen_k, causal, q.device)
    visible = (visibility.dense() if mask is None else mask).to(q.device)
    group = heads_q // heads_kv
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    kd = kd.repeat_interleave(group, dim=1)
    vd = vd.repeat_interleave(group, dim=1)
    z = (alpha - 1.0) * scale * qd @ kd.transpose(-1, -2)
    with torch.no_grad():
        _, tau = entmax_bisect(z, alpha, visible)
    gamma = 1.0 / (alpha - 1.0)
    tau0 = torch.where(torch.isfinite(tau), tau, torch.zeros_like(tau))[..., None]
    zv = torch.where(visible, z, torch.full_like(z, -1e300))
    # Implicit function theorem: tau(z) solves sum (z - tau)_+^gamma = 1, so
    # d tau / d z_j = w_j / sum w with w = (z - tau)_+^(gamma - 1). The term below has the value
    # tau0 (up to the bisection residual) and exactly that derivative.
    mass = (zv - tau0).clamp(min=0) ** gamma
    slope = (gamma * ((zv - tau0).clamp(min=0) ** (gamma - 1)) * (zv > tau0)).sum(-1, keepdim=True)
    tau_z = tau0 + (mass.sum(-1, keepdim=True) - 1.0) / slope.detach().clamp(min=1e-300)
    p = (zv - tau_z).clamp(min=0) ** gamma
    p = torch.where(visible & torch.isfinite(tau)[..., None], p, torch.zeros_like(p))
    out = (p @ vd).transpose(1, 2)
    return (out, tau) if return_tau else out
