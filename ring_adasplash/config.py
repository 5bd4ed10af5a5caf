"""The one table of strategies, and one keyword-only config that names the attention and how it is
spread over ranks. ``launch/``, ``benchmarks/`` and the tests read the strategies from here."""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_alpha, check_window


@dataclass(frozen=True)
class Strategy:
    """Where a strategy's function lives and what a caller must bring to it."""

    name: str
    module: str
    """Module of the function, imported on first use (``load``)."""
    function: str
    """Name of the function in ``module``; every one takes (q, k, v, alpha=, causal=, softmax_scale=)."""
    layout: str | None
    """How the sequence is cut across ranks (``parallel.layouts``; for ``usp`` the layout of its
    ring); None for one device."""
    heads_divisible: bool = False
    """The query heads must be a multiple of the ranks (heads are exchanged by all-to-all)."""
    two_groups: bool = False
    """Takes ``ulysses_group`` and ``ring_group`` (``parallel.build_usp_groups``), which the caller
    builds, instead of one ``group``; its shards come from ``parallel.usp_shard``."""
    package: str | None = None
    """A package it needs beyond this library's requirements."""

    @property
    def available(self) -> bool:
        """Whether ``package`` (if any) is installed."""
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def load(self) -> Callable:
        """The strategy's function."""
        return getattr(importlib.import_module(self.module), self.function)


_PARALLEL = "ring_adasplash.parallel"
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("single", "ring_adasplash.functional", "adasplash_func", None),
    Strategy("ring", f"{_PARALLEL}.ring", "ring_adasplash_func", "contiguous"),
    Strategy("zigzag", f"{_PARALLEL}.ring", "zigzag_ring_adasplash_func", "zigzag"),
    Strategy("allgather", f"{_PARALLEL}.allgather", "allgather_adasplash_func", "contiguous"),
    Strategy("ulysses", f"{_PARALLEL}.ulysses", "ulysses_adasplash_func", "contiguous", heads_divisible=True),
    Strategy("usp", f"{_PARALLEL}.usp", "usp_adasplash_func", "zigzag", two_groups=True),
    # DeepSpeed-Ulysses: DeepSpeed's DistributedAttention around our kernels
    Strategy("deepspeed", "ring_adasplash.integrations.deepspeed", "deepspeed_adasplash_func", "contiguous",
             heads_divisible=True, package="deepspeed"),
)}
"""Every strategy by name: ``single`` (one device), then the sequence-parallel ones."""


def resolve(name: str) -> Strategy:
    """The strategy called ``name``; a ValueError lists the valid names."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    return STRATEGIES[name]


def one_group_strategies(include_missing: bool = False) -> list[Strategy]:
    """The sequence-parallel strategies that take one process group (all but ``single`` and
    ``usp``), in table order; those whose package is missing only with ``include_missing``."""
    return [s for s in STRATEGIES.values()
            if s.layout is not None and not s.two_groups and (include_missing or s.available)]


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
    """One of ``STRATEGIES``: single (one device), ring, zigzag, allgather, ulysses, usp (2D
    Ulysses x ring: pass both groups to ``attention``), deepspeed (DeepSpeed's
    DistributedAttention around our kernels)."""

    window_size: tuple[int, int] = (-1, -1)
    """Sliding window (left, right) over global positions, as flash-attn's; -1 is unbounded. Not
    with the deepspeed strategy."""

    sink_tokens: int = 0
    """The first keys of the sequence that every query sees past its window's start."""

    def __post_init__(self):
        check_alpha(self.alpha)
        resolve(self.strategy)
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive or None; got {self.softmax_scale}")
        window = check_window(self.window_size, self.sink_tokens)
        if self.strategy == "deepspeed" and window != ((-1, -1), 0):
            raise ValueError("window_size and sink_tokens are not supported by the deepspeed strategy; use ulysses, "
                             "which exchanges the same way")

    @property
    def layout(self) -> str | None:
        """How the sequence is cut across ranks (``parallel.layouts``; for usp the ring's layout
        inside ``parallel.usp_shard``); None for one device."""
        return STRATEGIES[self.strategy].layout

    def attention(self, group=None, *, ulysses_group=None, ring_group=None) -> Callable:
        """``attend(q, k, v) -> out`` for this strategy over ``group`` (default: the world); usp
        takes ``ulysses_group`` and ``ring_group`` (``parallel.build_usp_groups``) instead."""
        strategy = STRATEGIES[self.strategy]
        options = dict(alpha=self.alpha, causal=self.causal, softmax_scale=self.softmax_scale)
        if self.strategy != "deepspeed":
            options.update(window_size=tuple(self.window_size), sink_tokens=self.sink_tokens)
        if strategy.two_groups:
            options.update(ulysses_group=ulysses_group, ring_group=ring_group, ring_layout=strategy.layout)
        elif strategy.layout is not None:
            options["group"] = group
        return functools.partial(strategy.load(), **options)


class ParallelAttention(torch.nn.Module):
    """Module form of ``AttentionConfig.attention`` (as yunchang's ``LongContextAttention``):
    ``forward(q, k, v)`` on this rank's shards (batch, seqlen_local, heads, head_dim), sharded as
    ``config.layout`` says, returns this rank's rows (batch, seqlen_local, heads_q, head_dim).

        attention = ParallelAttention(AttentionConfig(strategy="zigzag", window_size=(4096, 0)), group)
    """

    def __init__(self, config: AttentionConfig, group=None, *, ulysses_group=None, ring_group=None):
        super().__init__()
        self.config = config
        self.attend = config.attention(group, ulysses_group=ulysses_group, ring_group=ring_group)

    def forward(self, q, k, v):
        return self.attend(q, k, v)

    def extra_repr(self) -> str:
        c = self.config
        return (f"strategy={c.strategy}, alpha={c.alpha}, causal={c.causal}, window_size={c.window_size}, "
                f"sink_tokens={c.sink_tokens}")
