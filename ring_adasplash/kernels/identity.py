"""The caches that keep work per tensor between calls: what they know a tensor by, and how an
entry enters them."""
from __future__ import annotations

from typing import Callable

import torch


def tensor_identity(t: torch.Tensor) -> tuple:
    """The memory, layout and version counter of ``t``: two calls see the same key while the
    tensor is the same and unchanged (an in-place change bumps the version). A cache keyed by it
    holds the tensor, so that its memory cannot be handed to another tensor while the entry lives."""
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version)


def remembered_in(cache: dict, key, size: int, make: Callable):
    """``cache[key]``, made by ``make()`` on a miss; a full cache (``size`` entries) first drops
    its oldest entry."""
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        hit = cache[key] = make()
    return hit
