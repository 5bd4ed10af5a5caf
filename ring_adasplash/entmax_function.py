"""alpha-entmax over any tensor, along any dim: exact and differentiable; the forward runs as one
Triton program per row on CUDA tensors (``kernels.triton_entmax``: Newton steps on the row held in
registers), and as PyTorch elsewhere and for float64.

    p = entmax(x, alpha=1.5, dim=-1)   # p = [(alpha - 1) x - tau]_+ ** (1 / (alpha - 1)), sum p = 1

Every row is first shifted by its max (entmax is shift invariant, so large offsets cost no
precision). alpha 2 (sparsemax) and 1.5 solve tau in closed form on the sorted row; other alpha
take Newton steps from below on the gamma-norm of the gaps (``kernels.stats.newton_update``
explains why they converge for every alpha). Inputs in 16 bits compute in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_alpha
from .kernels import backend_for
from .kernels.entmax_spec import EntmaxSpec
from .kernels.stats import newton_update

GENERAL_NEWTON_STEPS = 30  # from max - 1, monotone; far more than rows of attention need


def _sorted_closed_form_tau(z: Tensor, power: int) -> Tensor:
    """tau of rows ``z`` (..., n), shifted so that their max is 0, for p = [z - tau]_+ ** power
    (power 1: sparsemax, 2: entmax-1.5): the largest support size k whose tau_k stays below the
    k-th largest z."""
    top, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = top.cumsum(-1) / k
    if power == 1:
        tau = mean - 1.0 / k
    else:
        spread = (top * top).cumsum(-1) / k - mean * mean
        tau = mean - torch.sqrt(((1.0 - k * spread) / k).clamp(min=0))
    support = (tau <= top).sum(-1, keepdim=True)  # tau_k <= z_(k) holds exactly for k <= support size
    return torch.gather(tau, -1, support - 1)


def _newton_tau(z: Tensor, spec: EntmaxSpec) -> Tensor:
    """tau of rows ``z`` (max 0): ``stats.newton_update`` steps on exact sums from t = -1 (tau >=
    max - 1), which never pass tau; tau <= 0 bounds them from above."""
    t, lower, upper = (torch.full_like(z[..., 0], bound) for bound in (-1.0, -1.0, 0.0))
    for _ in range(GENERAL_NEWTON_STEPS):
        sums = torch.stack([part.sum(-1) for part in spec.weights((z - t[..., None]).clamp(min=0))], -1)
        t, lower, upper = newton_update(t, lower, upper, sums, spec)
    return t[..., None].to(z.dtype)


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float, dim: int):
        compute = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).movedim(dim, -1)
        backend = backend_for(x)
        if backend.NAME == "triton":  # CUDA tensors (or the interpreter), never float64
            rows = compute.reshape(-1, compute.shape[-1]).contiguous()
            p = backend.entmax_rows(rows, alpha).view(compute.shape)
        else:
            top = compute.amax(-1, keepdim=True)
            # rows with a NaN, an inf, or nothing but -inf come out NaN (as softmax gives)
            invalid = ~torch.isfinite(top) | torch.isnan(compute).any(-1, keepdim=True)
            # below max - 1 nothing has p > 0 (p <= 1): -2 stands for -inf (masked entries) there
            z = ((alpha - 1.0) * (compute - top)).clamp(min=-2.0)
            z = torch.where(invalid, torch.zeros_like(z), z)
            spec = EntmaxSpec(alpha)
            tau = _sorted_closed_form_tau(z, spec.power) if spec.closed_form else _newton_tau(z, spec)
            p, _ = spec.weights((z - tau).clamp(min=0))
            p = p / p.sum(-1, keepdim=True)  # removes the last rounding of tau: rows sum to 1
            p = torch.where(invalid, float("nan"), p)
        ctx.save_for_backward(p)
        ctx.alpha, ctx.dim = alpha, dim
        return p.movedim(-1, dim).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        g = grad.to(p.dtype).movedim(ctx.dim, -1)
        # dp/dx = diag(u) - u u^T / sum u with u = p ** (2 - alpha) on the support
        u = torch.where(p > 0, p ** (2.0 - ctx.alpha), torch.zeros_like(p))
        dx = u * g - u * (u * g).sum(-1, keepdim=True) / u.sum(-1, keepdim=True).clamp(min=1e-300)
        return dx.movedim(-1, ctx.dim).to(grad.dtype), None, None


def entmax(x: Tensor, alpha: float = 1.5, dim: int = -1) -> Tensor:
    """alpha-entmax of ``x`` along ``dim`` (any shape): ``p = [(alpha - 1) x - tau]_+ ** (1 / (alpha - 1))``
    with tau set so that p sums to 1 along ``dim``. alpha in (1, 2]; 2 is sparsemax, 1.5 entmax-1.5,
    and alpha -> 1 tends to softmax. Differentiable in x; returns x's shape and dtype."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor; got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must index one of x's {x.dim()} dimensions; got dim={dim}")
    if x.shape[dim] == 0 or x.numel() == 0:
        return x.clone()
    return _Entmax.apply(x, check_alpha(alpha), dim % x.dim())


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """:func:`entmax` with alpha 1.5."""
    return entmax(x, 1.5, dim)


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """:func:`entmax` with alpha 2 (the Euclidean projection of x onto the simplex)."""
    return entmax(x, 2.0, dim)
