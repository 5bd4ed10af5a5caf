"""One keyword-only config that names the attention and how it is spread over ranks."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .checks import check_alpha

# strategy -> (module, function, sequence layout of the local shards)
STRATEGIES = {
    "single": ("ring_adasplash.functional", "adasplash_func", None),
    "ring": ("ring_adasplash.parallel.ring", "ring_adasplash_func", "contiguous"),
    "zigzag": ("ring_adasplash.parallel.ring", "zigzag_ring_adasplash_func", "zigzag"),
    "allgather": ("ring_adasplash.parallel.allgather", "allgather_adasplash_func", "contiguous"),
    "ulysses": ("ring_adasplash.parallel.ulysses", "ulysses_adasplash_func", "contiguous"),
    "deepspeed": ("ring_adasplash.integrations.deepspeed", "deepspeed_adasplash_func", "contiguous"),
}


@dataclass(kw_only=True, frozen=True)
class AttentionConfig:
    """Entmax attention and its sequence-parallel strategy.

    ``AttentionConfig(strategy="zigzag").attention(group)`` gives ``attend(q, k, v)`` on local
    shards (batch, seqlen_local, heads, head_dim); ``layout`` says how to shard the sequence.
    """

    alpha: float = 1.5
    """Entmax alpha in (1, 2]: 1.5 is entmax-1.5, 2 is sparsemax; both have closed-form fast paths."""

    causal: bool = True
    """Causal masking over global positions (bottom-right aligned on one device)."""

    softmax_scale: float | None = None
    """Multiplies q k^T before entmax; None means 1 / sqrt(head_dim)."""

    strategy: str = "ring"
    """One of ``STRATEGIES``: single (one device), ring, zigzag, allgather, ulysses, deepspeed
    (DeepSpeed's DistributedAttention around our kernels). 2D Ulysses x ring needs two process
    groups: call ``parallel.usp_adasplash_func`` directly."""

    def __post_init__(self):
        check_alpha(self.alpha)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive or None; got {self.softmax_scale}")

    @property
    def layout(self) -> str | None:
        """How the sequence is cut across ranks (``parallel.layouts``); None for one device."""
        return STRATEGIES[self.strategy][2]

    def attention(self, group=None) -> Callable:
        """``attend(q, k, v) -> out`` for this strategy over ``group`` (default: the world)."""
        module, name, layout = STRATEGIES[self.strategy]
        function = getattr(importlib.import_module(module), name)
        options = dict(alpha=self.alpha, causal=self.causal, softmax_scale=self.softmax_scale)
        if layout is not None:
            options["group"] = group
        return lambda q, k, v: function(q, k, v, **options)
