"""Per-head alpha: the query heads split into at most three groups, each run as one call: the
heads of alpha 1.5, those of alpha 2 (each of the two in its closed form, ``EntmaxSpec.power``),
and all the others together, whose kernels read each head's alpha (``EntmaxSpec.per_head``).

An alpha given per head that is the same on every head costs what one float alpha costs: one
group, with nothing selected or copied; so does a set of alphas none of which is 1.5 or 2. Where
the heads split, each group reads its own query heads and, for each of them, its key/value head
(``kv_heads``: GQA groups may be split between groups, so a group's keys are one per query head);
the gradients of a key head shared by several groups add up (``add_heads``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .entmax_spec import CLOSED_FORM_ALPHAS, EntmaxSpec
from .identity import remembered_in


@dataclass(frozen=True)
class HeadGroup:
    """An alpha (a float, or one per head of the group: ``EntmaxSpec``) and its query heads;
    ``q_heads`` None: every head (nothing to select)."""

    alpha: float | tuple[float, ...]
    q_heads: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None

    @property
    def whole(self) -> bool:
        return self.q_heads is None

    def queries(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The group's query heads of ``x`` along ``dim`` (2: (B, S, H, D); 1: (B, H, S) rows)."""
        return x if self.whole else x.index_select(dim, self.q_heads)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The key/value head of each of the group's query heads, of ``x`` (B, S, Hkv, D)."""
        return x if self.whole else x.index_select(2, self.kv_heads)


def group_plan(alphas: Sequence[float]) -> list[tuple[float | tuple[float, ...], list[int]]]:
    """``(alpha, query heads)`` per group (module doc), in order of first appearance; ``alphas``:
    one value, or one per query head; none (``()``): the values stay on the device
    (``checks.DeviceAlpha``), and one per-head group, ``((), [])``, holds every head."""
    values = tuple(float(a) for a in alphas)
    if not values:
        return [((), [])]
    if len(set(values)) == 1:
        return [(values[0], list(range(len(values))))]
    kinds = {}  # closed-form alpha, or None for the others
    for head, alpha in enumerate(values):
        kinds.setdefault(alpha if alpha in CLOSED_FORM_ALPHAS else None, []).append(head)
    return [(kind if kind is not None else tuple(values[h] for h in heads), heads) for kind, heads in kinds.items()]


def graph_key(alphas: Sequence[float]) -> tuple:
    """What of ``alphas`` a forward captured as a CUDA graph holds fixed: the groups' heads, and
    the alpha of each group of one alpha (1.5, 2, or the alpha of every head). Of a per-head
    group, only the log2 that its kernels were compiled for (``EntmaxSpec.power``), not its alphas:
    its kernels read them from the device (``EntmaxSpec.table``), so one graph serves every value
    that training gives them while they stay on their side of ``APPROX_LOG_MAX_GAMMA``."""
    return tuple((("per head", EntmaxSpec(alpha).power) if isinstance(alpha, tuple) else alpha, tuple(heads))
                 for alpha, heads in group_plan(alphas))


def head_groups(alphas: Sequence[float], heads_q: int, heads_kv: int, device) -> tuple[HeadGroup, ...]:
    """The groups of ``group_plan`` with their head indices on ``device``."""
    if len(alphas) not in (0, 1, heads_q):
        raise ValueError(f"alpha must give one value or one per query head ({heads_q}); got {len(alphas)}")
    plan = group_plan(alphas)
    if len(plan) == 1:
        return (HeadGroup(plan[0][0]),)
    indices = remembered_in(_GROUP_INDICES, (tuple(tuple(heads) for _, heads in plan), heads_q, heads_kv, str(device)),
                            GROUP_INDICES_CACHE_SIZE, lambda: _group_indices(plan, heads_q, heads_kv, device))
    return tuple(HeadGroup(alpha, q_heads, kv_heads) for (alpha, _), (q_heads, kv_heads) in zip(plan, indices))


# The groups' head indices, made once per split of the heads (not per alpha values, which a
# learnable alpha changes every step): a copy from the host to the device, which a CUDA graph's
# capture forbids (the forward's graphs are captured at a call's second sight, after an eager
# first call has made them) and which costs a wait on every eager call. A captured graph reads
# them by address, so it holds ``remembered()``.
_GROUP_INDICES: dict = {}
GROUP_INDICES_CACHE_SIZE = 64


def _group_indices(plan, heads_q: int, heads_kv: int, device) -> tuple:
    per_kv = heads_q // heads_kv
    indices = []
    for _, heads in plan:
        q_heads = torch.tensor(heads, dtype=torch.int64, device=device)
        indices.append((q_heads, q_heads // per_kv))
    return tuple(indices)


def group_spec(group: HeadGroup, table: torch.Tensor | None) -> EntmaxSpec:
    """The ``EntmaxSpec`` of ``group``, whose kernels read its heads' alphas from ``table`` (one per
    query head of the call, float64 on the device) where one is given, else from its values."""
    return EntmaxSpec(group.alpha, None if table is None or not table.numel() else group.queries(table, 0))


def remembered() -> list:
    """The groups' head indices kept between calls."""
    return list(_GROUP_INDICES.values())


def join_heads(parts: Sequence[torch.Tensor], groups: Sequence[HeadGroup], dim: int, heads: int) -> torch.Tensor:
    """The groups' per-head results side by side again: ``parts[i]`` holds group i's heads along
    ``dim``; the result has all ``heads`` there, in their original order."""
    if len(groups) == 1 and groups[0].whole:
        return parts[0]
    shape = list(parts[0].shape)
    shape[dim] = heads
    joined = parts[0].new_empty(shape)
    for part, group in zip(parts, groups):
        joined.index_copy_(dim, group.q_heads, part)
    return joined


def add_heads(parts: Sequence[torch.Tensor], groups: Sequence[HeadGroup], heads_kv: int) -> torch.Tensor:
    """dk or dv (B, Sk, Hkv, D) from the groups' (B, Sk, len(group), D), one per query head: a key
    head's gradient is the sum over the query heads that read it."""
    if len(groups) == 1 and groups[0].whole:
        return parts[0]
    shape = list(parts[0].shape)
    shape[2] = heads_kv
    total = parts[0].new_zeros(shape)
    for part, group in zip(parts, groups):
        total.index_add_(2, group.kv_heads, part)
    return total


def alpha_gradient_per_head(rows: Sequence[torch.Tensor], groups: Sequence[HeadGroup], heads: int) -> torch.Tensor:
    """dL/dalpha per query head (heads,) from each group's per-row gradients (B, len(group), S)."""
    per_group = [r.sum(dim=(0, 2)) for r in rows]
    return join_heads(per_group, groups, 0, heads)


def backward_by_group(groups: Sequence[HeadGroup], results: Sequence, run: Callable, heads: int, heads_kv: int,
                      alpha_grad: bool) -> tuple:
    """dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D) and, with ``alpha_grad``, dL/dalpha per query
    head (Hq,) (else None), from ``run(group, result)`` per group: its ``entmax_backward``
    ``(dq, dk, dv, dL/dalpha per row)``."""
    grads = [run(g, r) for g, r in zip(groups, results)]
    dq = join_heads([d[0] for d in grads], groups, 2, heads)
    dk, dv = (add_heads([d[i] for d in grads], groups, heads_kv) for i in (1, 2))
    d_alpha = alpha_gradient_per_head([d[3] for d in grads], groups, heads) if alpha_grad else None
    return dq, dk, dv, d_alpha


def to_alpha_shape(per_head: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """dL/dalpha per query head in the shape and dtype of the alpha tensor given: one value
    shared by every head (their sum), or one per head."""
    grad = per_head if per_head.numel() == alpha.numel() else per_head.sum()
    return grad.reshape(alpha.shape).to(alpha.dtype)
