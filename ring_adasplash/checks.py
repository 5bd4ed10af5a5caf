"""Input checks shared by every public function: clear errors that name the argument."""
from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_alpha(alpha) -> float:
    """alpha as a float in (1, 2]. As alpha -> 1 entmax tends to softmax: its support grows to the
    whole row and no tile is zero (alpha 1.001 is supported: no power overflows); 2 is sparsemax.
    Where one alpha per head or a learnable alpha is accepted, see ``check_head_alpha``."""
    if isinstance(alpha, torch.Tensor):
        if alpha.requires_grad:
            raise TypeError("alpha must be a float or a tensor without requires_grad here (a learnable alpha is "
                            "taken by the attention functions, not by this argument)")
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be one number in (1, 2]; got a tensor of shape {tuple(alpha.shape)}")
    alpha = float(alpha)
    if not (1.0 < alpha <= 2.0):
        raise ValueError(f"alpha must be in (1, 2] (1.5: entmax-1.5, 2: sparsemax); got {alpha}")
    return alpha


class DeviceAlpha(NamedTuple):
    """A tensor alpha whose values stay on the device: ``alpha=DeviceAlpha(t)`` with ``t`` of
    shape (), (1,) or (heads_q,), learnable or not. Any other tensor alpha is copied to the host
    on every call, to check its range and to give one value on every head the float alpha's
    kernels (the closed forms' schedule at 1.5 and 2), which waits for the work queued before the
    call. Here every head runs the general form's schedule, reading its alpha on the device (a
    head of exactly 1.5 or 2 still takes its closed form's powers in the kernels' loops), and
    nothing waits; a value outside (1, 2] is not
    raised but makes its head's rows NaN (a parametrisation such as ``1 + sigmoid(x)`` clamped
    away from 1 keeps it inside)."""

    tensor: torch.Tensor


class HeadAlpha(NamedTuple):
    """alpha after ``check_head_alpha``: ``values``, one float or one per query head, each in
    (1, 2], or ``()`` where the values stay on the device (``DeviceAlpha``: ``tensor`` holds
    them); ``tensor``, the tensor given where its gradient is wanted (``requires_grad``) or
    where it holds the values, else None."""

    values: tuple[float, ...]
    tensor: torch.Tensor | None = None

    @property
    def on_device(self) -> bool:
        """Whether the values stay on the device (``DeviceAlpha``)."""
        return not self.values

    @property
    def count(self) -> int:
        """How many alphas: one (shared by every head) or one per query head."""
        return self.tensor.numel() if self.on_device else len(self.values)

    def for_heads(self, start: int, stop: int) -> "HeadAlpha":
        """The alpha of query heads [start, stop) (a shared alpha stays shared)."""
        if self.count == 1:
            return self
        return HeadAlpha(self.values[start:stop], None if self.tensor is None else self.tensor.reshape(-1)[start:stop])

    def table(self, heads: int, device) -> torch.Tensor | None:
        """Where the values stay on the device: one alpha per query head, float64 on ``device``,
        NaN where a value is outside (1, 2] (its head's rows then come out NaN); else None."""
        if not self.on_device:
            return None
        alphas = self.tensor.detach().reshape(-1).to(device=device, dtype=torch.float64).expand(heads)
        return torch.where((alphas > 1.0) & (alphas <= 2.0), alphas, float("nan"))


def check_head_alpha(alpha, heads: int) -> HeadAlpha:
    """alpha as a float, a one-element tensor or a tensor of shape (heads,) (one per query head),
    each value in (1, 2]; a tensor with ``requires_grad`` gets its gradient. Reading a CUDA
    tensor's values waits for the device (one small copy per call); a ``DeviceAlpha`` is not
    read (its shape and dtype are checked; ``values`` ``()``). A ``HeadAlpha`` (checked
    already, as the strategies pass it on) is returned as it is."""
    if isinstance(alpha, HeadAlpha):
        if alpha.count not in (1, heads):
            raise ValueError(f"alpha must give one value or one per query head ({heads}); got {alpha.count}")
        return alpha
    if isinstance(alpha, DeviceAlpha):
        if not isinstance(alpha.tensor, torch.Tensor):
            raise TypeError(f"alpha: DeviceAlpha holds a tensor; got {type(alpha.tensor).__name__}")
        _check_alpha_tensor(alpha.tensor, heads, "DeviceAlpha")
        return HeadAlpha((), alpha.tensor)
    if not isinstance(alpha, torch.Tensor):
        return HeadAlpha((check_alpha(alpha),))
    _check_alpha_tensor(alpha, heads, "a tensor")
    values = tuple(alpha.detach().cpu().double().reshape(-1).tolist())  # widened on the host: no device cast
    bad = [(h, a) for h, a in enumerate(values) if not 1.0 < a <= 2.0]
    if bad:
        raise ValueError("alpha must be in (1, 2] on every head (1.5: entmax-1.5, 2: sparsemax); got "
                         + ", ".join(f"{a} at head {h}" for h, a in bad[:4]))
    return HeadAlpha(values, alpha if alpha.requires_grad else None)


def _check_alpha_tensor(alpha, heads: int, what: str) -> None:
    """The shape and dtype of a tensor alpha (``check_head_alpha``); ``what`` names its form."""
    if alpha.dim() > 1 or alpha.numel() not in (1, heads):
        raise ValueError(f"alpha must be a float, a one-element tensor or a tensor of shape ({heads},) (one per "
                         f"query head); got {what} of shape {tuple(alpha.shape)}")
    if not alpha.is_floating_point():
        raise TypeError(f"alpha must be a floating-point tensor; got {alpha.dtype}")


def check_qkv(q, k, v, *, varlen: bool = False, backend=None):
    """Checks shapes, dtypes and devices; returns (Hq, Hkv, D).

    Dense layout: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D). Varlen: q (total_q, Hq, D), k and v
    (total_k, Hkv, D).
    """
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {layout}; got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {layout} ({rank} dims); got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size; got {q.shape[0]} and {k.shape[0]}")
    heads_q, dim = q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    if heads_kv == 0 and heads_q:
        raise ValueError(f"k and v have no heads but q has {heads_q}; shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape[-1] != dim:
        raise ValueError(f"q and k must have the same head_dim; got {dim} and {k.shape[-1]}")
    if heads_kv and heads_q % heads_kv != 0:
        raise ValueError(f"heads of q ({heads_q}) must be a multiple of heads of k and v ({heads_kv}) (GQA/MQA)")
    if q.shape[-3] == 0 or k.shape[-3] == 0:
        raise ValueError(f"sequence lengths must be positive; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    supported = getattr(backend, "SUPPORTED_HEAD_DIMS", None)
    if supported is not None and dim not in supported:
        raise ValueError(f"head_dim {dim} is not supported by the {backend.NAME} kernels; expected one of {supported}")
    return heads_q, heads_kv, dim


def check_cu_seqlens(cu_seqlens, total: int, name: str) -> torch.Tensor:
    """1-D integer, starts at 0, nondecreasing, ends at ``total``."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of (num_seqs + 1) offsets; got {cu_seqlens!r:.80}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64; got {cu_seqlens.dtype}")
    cpu = cu_seqlens.cpu()
    if int(cpu[0]) != 0 or int(cpu[-1]) != total or bool((cpu[1:] < cpu[:-1]).any()):
        raise ValueError(f"{name} must start at 0, never decrease and end at {total} (the packed length); "
                         f"got {cpu.tolist()[:8]}{'...' if cpu.numel() > 8 else ''}")
    return cu_seqlens


def check_key_padding_mask(mask, batch: int, seqlen_k: int, device) -> torch.Tensor:
    """``key_padding_mask`` as a bool (batch, seqlen_k) tensor on ``device`` (True: the key is kept)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (batch, seqlen_k) = ({batch}, {seqlen_k}), "
                        f"True for the keys to keep; got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (batch, seqlen_k):
        raise ValueError(f"key_padding_mask must have shape (batch, seqlen_k) = ({batch}, {seqlen_k}); got "
                         f"{tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on the device of q ({device}); got {mask.device}")
    return mask


def check_position_ids(position_ids, batch: int, seqlen_q: int, seqlen_k: int, padded: bool, device) -> torch.Tensor:
    """``position_ids`` as an integer (batch, seqlen) tensor for self-attention without a padding mask."""
    if padded:
        raise ValueError("position_ids (packed documents) and key_padding_mask cannot be given together; give one")
    if seqlen_q != seqlen_k:
        raise ValueError(f"position_ids mark documents of self-attention: seqlen_q must equal seqlen_k; got "
                         f"{seqlen_q} and {seqlen_k}")
    if (not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int32, torch.int64)
            or tuple(position_ids.shape) != (batch, seqlen_q)):
        raise ValueError(f"position_ids must be an int32 or int64 tensor of shape (batch, seqlen) = ({batch}, "
                         f"{seqlen_q}); got {getattr(position_ids, 'dtype', type(position_ids).__name__)} of shape "
                         f"{tuple(getattr(position_ids, 'shape', ()))}")
    if position_ids.device != device:
        raise ValueError(f"position_ids must be on the device of q ({device}); got {position_ids.device}")
    return position_ids


def check_window(window_size, sink_tokens) -> tuple[tuple[int, int], int]:
    """``window_size`` as (left, right) ints >= -1 (-1: unbounded) and ``sink_tokens`` as an int >= 0."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right), two ints >= -1 (-1: unbounded; query i sees keys "
                         f"i - left to i + right); got {window_size!r}")
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0 (the first keys of each sequence that every query "
                         f"sees); got {sink_tokens!r}")
    return (int(window_size[0]), int(window_size[1])), int(sink_tokens)


def default_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    softmax_scale = float(softmax_scale)
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive; got {softmax_scale}")
    return softmax_scale
