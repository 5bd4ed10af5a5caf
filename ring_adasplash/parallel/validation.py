"""Input checks of sequence-parallel attention that fail on every rank of every group at once.

A rank that raised alone would leave its peers waiting forever in the next exchange. So each rank
runs its local checks, keeps any error, and then joins one small collective per process group
(``comm.check_same_on_all_ranks``), carrying an error learnt in one group into the next. With the
groups of a 2D mesh (Ulysses groups, then ring groups) every rank shares a ring group with a member
of every Ulysses group, so two rounds reach every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..checks import HeadAlpha, check_head_alpha, check_qkv, check_window, default_scale
from ..comm import check_same_on_all_ranks
from ..kernels import backend_for
from ..kernels.algorithm import default_schedule


def checked_on_groups(local_checks: Callable[[], tuple[dict, Any]], groups: Sequence) -> Any:
    """Run ``local_checks()``, which returns ``(description, checked)``: the description every rank
    must agree on, and what the checks computed (raises ValueError/TypeError on bad input); then
    one agreement round per group in ``groups``. Returns ``checked``. Raises on every rank of the
    union of the groups when any rank failed or ranks disagree.

    Under ``torch.compile`` only the local checks run (at trace time, on every rank): a collective
    of Python objects cannot be part of a graph.
    """
    if torch.compiler.is_compiling():
        return local_checks()[1]
    error, description, checked = None, {}, None
    try:
        description, checked = local_checks()
    except (ValueError, TypeError) as exc:
        error = exc
    for group in groups:
        try:
            check_same_on_all_ranks(description, group, error)
        except (ValueError, TypeError) as exc:
            error = exc
    if error is not None:
        raise error
    return checked


@dataclass(frozen=True)
class CheckedOptions:
    """Options of a sequence-parallel call after the checks: alpha, the softmax scale with its
    default filled in, and what the strategy's own checks returned."""

    alpha: HeadAlpha
    softmax_scale: float
    extra: Any = None
    window_size: tuple = (-1, -1)
    sink_tokens: int = 0


def options_description(q, k, alpha: HeadAlpha, causal: bool, softmax_scale: float, window_size: tuple,
                        sink_tokens: int) -> dict:
    """What every rank of a call must agree on: the local shapes, dtype and the checked options,
    and the schedule, which sets how many key sweeps (or all-reduces) the forward makes."""
    return {"q": tuple(q.shape), "k": tuple(k.shape), "dtype": str(q.dtype), "alpha": alpha.values,
            "causal": bool(causal), "softmax_scale": softmax_scale, "window_size": window_size,
            "sink_tokens": sink_tokens, "schedule": default_schedule()}


def validated_self_attention(q, k, v, alpha, softmax_scale, causal: bool, groups: Sequence,
                             extra_checks: Callable[[], tuple[dict, Any]] | None = None,
                             varlen: bool = False, window_size=(-1, -1), sink_tokens=0) -> CheckedOptions:
    """Checks of sharded self-attention inputs q (batch, seqlen_local, heads_q, head_dim) and
    k, v (batch, seqlen_local, heads_kv, head_dim) (varlen: (total_local, heads, head_dim)) plus
    the options, agreed over ``groups``.

    ``extra_checks()``: strategy-specific checks (head counts, layouts); returns ``(more
    description, what they computed)``, which comes back as ``CheckedOptions.extra``.
    ``window_size`` and ``sink_tokens``: as in ``adasplash_func``, over global positions.
    """

    def local_checks():
        heads, _, dim = check_qkv(q, k, v, varlen=varlen, backend=backend_for(q))
        checked_alpha = check_head_alpha(alpha, heads)
        seq_axis = 0 if varlen else 1
        if q.shape[seq_axis] != k.shape[seq_axis]:
            raise ValueError(f"q and k must hold the same tokens (local seqlen {q.shape[seq_axis]} vs "
                             f"{k.shape[seq_axis]}): "
                             "sequence-parallel attention here is self-attention over one sequence")
        scale = default_scale(softmax_scale, dim)
        window, sinks = check_window(window_size, sink_tokens)
        description = options_description(q, k, checked_alpha, causal, scale, window, sinks)
        extra = None
        if extra_checks is not None:
            more, extra = extra_checks()
            description.update(more)
        return description, CheckedOptions(checked_alpha, scale, extra, window, sinks)

    return checked_on_groups(local_checks, groups)
