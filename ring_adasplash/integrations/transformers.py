"""Entmax attention as Hugging Face transformers attention implementations.

    from ring_adasplash.integrations import transformers as ras_hf
    ras_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="adasplash")

Names registered in ``AttentionInterface`` (and ``AttentionMaskInterface``):
    "adasplash"          one device, :func:`ring_adasplash.adasplash_func`
    "adasplash_ring"     ring over a contiguous sequence shard      (``parallel.ring_adasplash_func``)
    "adasplash_zigzag"   ring over a zigzag sequence shard          (``parallel.zigzag_ring_adasplash_func``)
    "adasplash_ulysses"  Ulysses over a contiguous sequence shard   (``parallel.ulysses_adasplash_func``)
The sequence-parallel ones use the group given to :func:`set_sequence_parallel_group` (default:
world). Each rank feeds its shard of the tokens and passes their global ``position_ids`` (RoPE);
the model's loss over the local tokens must then be combined across ranks as in ``launch/train.py``.

alpha (``module_alpha``): the attention module's own ``entmax_alpha`` (a learnable tensor of shape
(heads_q,) or (), set by the user) when it has one, else ``module.config.entmax_alpha`` (a float,
or a list of one per query head), else 1.5. causal: ``module.is_causal``
(an ``is_causal`` keyword wins). Scale: the ``scaling`` transformers passes. "adasplash" takes
padding (left or right, in training and in batched ``generate``, static caches included) as
``key_padding_mask`` and a layer's ``sliding_window`` as ``window_size``; its mask builder returns
the 2D padding mask, as flash attention's does, so the mask handling traces without a graph
break. Attention dropout is not supported, nor padding or sliding windows in the sequence-parallel
names, which also need the global ``position_ids`` of each rank's tokens: they raise a ValueError,
on every rank at once (pack documents and call ``ring_adasplash_varlen_func`` instead). Packed
sequences marked by ``position_ids`` that restart at 0 (no mask, as transformers' flash attention
takes them) attend within their own document.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..functional import adasplash_func
from ..parallel import layouts
from ..parallel.validation import checked_on_groups

DEFAULT_ALPHA = 1.5
_sequence_parallel_group = None


def set_sequence_parallel_group(group) -> None:
    """Process group of the "adasplash_ring", "adasplash_zigzag" and "adasplash_ulysses" implementations."""
    global _sequence_parallel_group
    _sequence_parallel_group = group


def _check_options(dropout: float, kwargs: dict) -> None:
    if dropout:
        raise ValueError(f"entmax attention has no attention dropout; got dropout={dropout} (set "
                         "config.attention_dropout=0)")
    if kwargs.get("output_attentions"):
        raise ValueError("entmax attention implementations return no attention weights (output_attentions=True); "
                         "use attn_implementation='eager' with an entmax attention function for them")


def _sliding_window(module, kwargs: dict):
    """The layer's window: the ``sliding_window`` keyword (Mistral passes it) or attribute (Qwen2's
    sliding layers), None for full attention."""
    window = kwargs.get("sliding_window")
    return getattr(module, "sliding_window", None) if window is None else window


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  **kwargs):
    """Mask builder of "adasplash": the 2D padding mask (batch, seen tokens) as bool, cut to the last
    ``kv_length`` (a sliding-window cache), or None. Eager calls drop a mask with no padding (one
    read on the host); compiled ones keep it, which traces. A static cache holds more key slots
    than the ``q_offset + q_length`` tokens written so far: then a mask of the written ones is
    returned even without padding, so that the attention cuts the keys to them."""
    if attention_mask is None:
        written = int(q_offset) + q_length
        if written >= kv_length:
            return None
        return torch.ones(batch_size, written, dtype=torch.bool, device=kwargs.get("device"))
    keep = attention_mask[:, -kv_length:].bool()
    if not torch.compiler.is_compiling() and keep.shape[1] == kv_length and bool(keep.all()):
        return None
    return keep


def module_alpha(module):
    """The alpha of an attention module (module doc): its own ``entmax_alpha`` tensor (learnable),
    else its config's ``entmax_alpha`` (a float or one per query head), else 1.5."""
    own = getattr(module, "entmax_alpha", None)
    if isinstance(own, torch.Tensor):
        return own
    alpha = getattr(getattr(module, "config", None), "entmax_alpha", DEFAULT_ALPHA)
    return torch.tensor(alpha, dtype=torch.float64) if isinstance(alpha, (list, tuple)) else alpha


def _single_device_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """"adasplash": query (b, heads_q, s, d), key and value (b, heads_kv, s_k, d) -> ((b, s, heads_q, d), None).
    ``attention_mask``: None or ``_padding_mask``'s (b, seen) bool. A static cache holds more key
    slots than tokens seen: the keys are cut to the mask's length, so that causal alignment stays
    bottom-right."""
    _check_options(dropout, kwargs)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    alpha = module_alpha(module)
    sliding_window = _sliding_window(module, kwargs)
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, -1)  # keys j > i - sliding_window
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            raise ValueError(f"the 'adasplash' attention takes the 2D padding mask its own mask builder gives; got "
                             f"{attention_mask.dtype} of shape {tuple(attention_mask.shape)}")
        key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
    position_ids = kwargs.get("position_ids")
    packed = attention_mask is None and query.shape[2] == key.shape[2] and _restarts(position_ids)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out = adasplash_func(q, k, v, alpha=alpha, causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask,
                         window_size=window, position_ids=position_ids.expand(q.shape[0], -1) if packed else None)
    return out, None


# the position_ids every layer of one forward shares, its version, and whether it restarts (held, so
# that its memory cannot pass to another tensor while it is remembered)
_restart_memo: list = [None, None, False]


def _restarts(position_ids) -> bool:
    """Whether ``position_ids`` mark packed sequences (a row's positions restart at 0), as
    transformers' flash attention detects them. Eager calls read it on the host once per tensor
    (every layer of a forward passes the same one); compiled calls take the packed path whenever
    positions are given, which is right in both cases and traces."""
    if position_ids is None:
        return False
    if torch.compiler.is_compiling():
        return True
    if _restart_memo[0] is not position_ids or _restart_memo[1] != position_ids._version:
        _restart_memo[:] = [position_ids, position_ids._version, bool((position_ids[:, 1:] == 0).any())]
    return _restart_memo[2]


def _make_forward(attend, layout: str):
    """A sequence-parallel transformers attention function: (module, query, key, value,
    attention_mask, scaling, dropout) with query (b, heads_q, s, d), key and value (b, heads_kv,
    s_k, d) -> ((b, s, heads_q, d), None); the tokens of each rank are its ``layout`` shard."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        def check_positions(position_ids):
            world = dist.get_world_size(_sequence_parallel_group)
            expected = layouts.positions(layout, query.shape[2] * world, dist.get_rank(_sequence_parallel_group),
                                         world, query.device)
            if position_ids is None or not bool((position_ids == expected).all()):
                given = "none" if position_ids is None else position_ids.flatten()[:4].tolist()
                raise ValueError(f"sequence-parallel entmax attention needs position_ids: the global positions of this "
                                 f"rank's tokens in the {layout} layout, {expected[:4].tolist()}... "
                                 f"(parallel.layouts.positions), so that RoPE sees them; got {given}... (transformers "
                                 "numbers the local tokens from 0 when none are given)")

        def local_checks():
            _check_options(dropout, kwargs)
            if _sliding_window(module, kwargs) is not None:
                raise ValueError(f"sliding-window layers are not supported by the sequence-parallel entmax "
                                 f"attention; got sliding_window={_sliding_window(module, kwargs)}")
            check_positions(kwargs.get("position_ids"))
            if attention_mask is not None:
                raise ValueError("padding masks are not supported by sequence-parallel entmax attention; pack the "
                                 "documents and use ring_adasplash_varlen_func")
            return {}, None

        # every rank checks, then all agree: a rank that raised alone would leave its peers waiting
        checked_on_groups(local_checks, [_sequence_parallel_group])
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
        alpha = module_alpha(module)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
        return attend(q, k, v, alpha=alpha, causal=causal, softmax_scale=scaling, group=_sequence_parallel_group), None

    return forward


def _sequence_parallel_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                            attention_mask=None, **kwargs):
    """Mask builder of the sequence-parallel names: shapes are local there, so no causal mask is
    built (the attention knows the global positions); a 2D mask with padding is passed on, and the
    attention refuses it on every rank at once."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def implementations() -> dict:
    """Name -> (attention function, mask builder) for every implementation ``register`` adds."""
    from ..parallel import ring_adasplash_func, ulysses_adasplash_func, zigzag_ring_adasplash_func

    parallel = {"adasplash_ring": (ring_adasplash_func, "contiguous"),
                "adasplash_zigzag": (zigzag_ring_adasplash_func, "zigzag"),
                "adasplash_ulysses": (ulysses_adasplash_func, "contiguous")}
    found = {"adasplash": (_single_device_forward, _padding_mask)}
    found.update({name: (_make_forward(fn, layout), _sequence_parallel_mask) for name, (fn, layout) in parallel.items()})
    return found


def register() -> list[str]:
    """Add the implementations to transformers' ``AttentionInterface`` and ``AttentionMaskInterface``;
    returns their names."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("register() needs Hugging Face transformers: pip install transformers") from exc
    for name, (attention, mask) in implementations().items():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
    return list(implementations())
