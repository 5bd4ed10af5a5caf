"""Helpers the tests share: random inputs, relative error, the float64 reference with its
gradients, and sharding a global sequence across ranks and back (conftest puts tests/ on the path;
the ranks of ``distributed_utils.run_distributed`` import this module as the test modules do)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def positional_code(seqlen: int, dim: int, amp: float, base: float = 256.0) -> torch.Tensor:
    """(1, seqlen, 1, dim) ``amp * (cos(i w_f), sin(i w_f))``, ``w_f = base ** (-f / (dim / 2))``:
    added to q and k it makes scores peak near the diagonal (a sparse support)."""
    angles = torch.arange(seqlen)[:, None] * (base ** (-torch.arange(dim // 2) / (dim // 2)))[None]
    return amp * torch.cat([angles.cos(), angles.sin()], -1)[None, :, None]


def random_qkv(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, heads_kv: int, dim: int, *,
               amp: float = 2.0, seed: int = 0, structured: bool = False, grad_out: bool = False,
               dtype: torch.dtype = torch.float32, device="cpu", requires_grad: bool = False) -> list[torch.Tensor]:
    """``[q, k, v]`` (and an output gradient with ``grad_out``), (batch, seqlen, heads, dim), drawn
    in that order from one CPU generator seeded with ``seed``, then moved to ``device`` and ``dtype``.

    q and k are ``amp * N(0, 1)``, or with ``structured`` ``positional_code(amp) + N(0, 1)``; v and
    the output gradient are ``N(0, 1)``.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(seqlen, heads, scaled):
        noise = torch.randn(batch, seqlen, heads, dim, generator=g)
        if not scaled:
            return noise
        return positional_code(seqlen, dim, amp) + noise if structured else amp * noise

    tensors = [draw(seqlen_q, heads_q, True), draw(seqlen_k, heads_kv, True), draw(seqlen_k, heads_kv, False)]
    if grad_out:
        tensors.append(draw(seqlen_q, heads_q, False))
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    return [t.requires_grad_() for t in tensors] if requires_grad else tensors


def reference_with_grads(q, k, v, grad_out, alpha: float, causal: bool, device=None, **kwargs) -> list[torch.Tensor]:
    """``[out, dq, dk, dv]`` of the float64 dense reference (on ``device``, default q's), returned
    on q's device."""
    from ring_adasplash.reference import entmax_attention_reference

    qd, kd, vd = (t.double().to(device or t.device).requires_grad_() for t in (q, k, v))
    out = entmax_attention_reference(qd, kd, vd, alpha, causal, **kwargs)
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.double().to(qd.device))
    return [t.to(q.device) for t in (out, *grads)]


def shard_sequence(x: torch.Tensor, layout: str, rank: int, world: int, mesh=None) -> torch.Tensor:
    """This rank's shard of a global (batch, seqlen, ...) tensor: ``parallel.layouts`` ``layout``,
    or with a ``parallel.UspMesh`` the USP layout whose ring uses ``layout``."""
    from ring_adasplash import parallel

    if mesh is not None:
        return parallel.usp_shard(x, mesh, layout)
    return parallel.layouts.shard(x, layout, rank, world)


def gather_sequence(x: torch.Tensor, layout: str, world: int, mesh=None) -> torch.Tensor:
    """The global tensor from every rank's shard ``x`` (every rank calls it), the inverse of
    ``shard_sequence``."""
    from ring_adasplash import parallel

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    if mesh is not None:
        return parallel.usp_unshard(parts, mesh, layout)
    return parallel.layouts.unshard(parts, layout, world)


def bisect_attention(q, k, v, alpha, causal=True, softmax_scale=None):
    """out (B, S, H, D) of ``entmax_bisect`` over dense scores, alpha per query head (H,) or one
    value; differentiable in q, k, v and alpha by the package's own backward."""
    from entmax import entmax_bisect

    batch, seqlen_q, heads, dim = q.shape
    seqlen_k, group = k.shape[1], heads // k.shape[2]
    k, v = (x.repeat_interleave(group, 2) for x in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (dim ** -0.5 if softmax_scale is None else softmax_scale)
    if causal:
        hidden = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q).logical_not()
        scores = scores.masked_fill(hidden, -1e4)  # p = 0 there for every alpha >= 1.1 at these scales
    alpha = torch.as_tensor(alpha, dtype=scores.dtype).reshape(-1)
    alpha = alpha.view(1, -1, 1, 1).expand(batch, heads, seqlen_q, 1)
    p = entmax_bisect(scores, alpha, dim=-1, n_iter=200)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)
