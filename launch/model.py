"""A small decoder-only transformer whose attention runs sequence-parallel.

Each rank holds a shard of the sequence. The model only needs two things from the
parallel setup: the global position of every local token (for RoPE, so rotations match
the single-device model) and an attention callable ``attend(q, k, v, alpha, group)`` that
sees the whole sequence through communication. Everything else is per token.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ring_adasplash import DeviceAlpha

Attend = Callable[..., torch.Tensor]  # attend(q, k, v, alpha, group) on (B, S_local, H, D)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, S, H, D) by angles set by global ``positions`` (S,)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * freqs  # (S, D/2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal alpha-entmax attention with grouped key/value heads."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, alpha: float, attend: Attend, group=None,
                 learn_alpha: bool = False):
        super().__init__()
        if d_model % heads or heads % kv_heads:
            raise ValueError("need d_model % heads == 0 and heads % kv_heads == 0")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        self.fixed_alpha, self.attend, self.group = alpha, attend, group
        # learnable: alpha = 1 + sigmoid(logit) per head, in (1, 2), starting at ``alpha``
        self.alpha_logit = nn.Parameter(torch.full((heads,), math.log((alpha - 1) / (2 - alpha)))) if learn_alpha \
            else None
        self.qkv = nn.Linear(d_model, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, -1, self.head_dim).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=2
        )
        q, k = rope(q, positions), rope(k, positions)
        # a learnable alpha stays on the GPU: read on the host, it would wait for the GPU in every layer
        alpha = self.alpha if self.alpha_logit is None else DeviceAlpha(self.alpha)
        y = self.attend(q, k, v.contiguous(), alpha, self.group)
        return self.out(y.reshape(batch, seqlen, -1))


    @property
    def alpha(self):
        """The float alpha, or the learnable per-head tensor (heads,)."""
        if self.alpha_logit is None:
            return self.fixed_alpha
        # kept above 1: in float32, 1 + sigmoid(x) is exactly 1 below x = -16, which is no entmax
        return 1 + torch.sigmoid(self.alpha_logit).clamp(min=2 ** -10)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        hidden = 32 * -(-8 * d_model // (3 * 32))  # ~8/3 d_model keeps the parameter count of a 4x MLP
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, kv_heads: int, alpha: float, attend: Attend, group=None,
                 learn_alpha: bool = False):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.attn = Attention(d_model, heads, kv_heads, alpha, attend, group, learn_alpha)
        self.mlp = SwiGLU(d_model)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Pre-norm decoder: embedding, ``layers`` blocks, final RMSNorm, output head tied to the embedding."""

    def __init__(self, vocab_size: int, d_model: int, layers: int, heads: int, kv_heads: int,
                 alpha: float, attend: Attend, group=None, learn_alpha: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads, alpha, attend, group, learn_alpha)
                                    for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        # Tied: a token copied through attention already scores itself, so recall is learned sooner.
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, S_local, vocab) for local ``tokens`` at global ``positions``."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(self.norm(x))
