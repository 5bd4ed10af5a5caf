"""What the caches that keep work per tensor between calls know a tensor by."""
from __future__ import annotations

import torch


def tensor_identity(t: torch.Tensor) -> tuple:
    """The memory, layout and version counter of ``t``: two calls see the same key while the
    tensor is the same and unchanged (an in-place change bumps the version). A cache keyed by it
    holds the tensor, so that its memory cannot be handed to another tensor while the entry lives."""
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version)
