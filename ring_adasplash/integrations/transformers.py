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

alpha: ``module.config.entmax_alpha`` when the config has it, else 1.5. causal: ``module.is_causal``
(an ``is_causal`` keyword wins). Scale: the ``scaling`` transformers passes. Padding masks, packed
sequences, sliding windows and attention dropout are not supported: they raise a ValueError (pack
documents and call ``adasplash_varlen_func`` / ``ring_adasplash_varlen_func`` instead).
"""
from __future__ import annotations

import torch

from ..functional import adasplash_func

DEFAULT_ALPHA = 1.5
_sequence_parallel_group = None


def set_sequence_parallel_group(group) -> None:
    """Process group of the "adasplash_ring", "adasplash_zigzag" and "adasplash_ulysses" implementations."""
    global _sequence_parallel_group
    _sequence_parallel_group = group


def _check_plain(module, attention_mask, dropout: float, causal: bool, seqlen_q: int, seqlen_k: int) -> None:
    """Accept no mask or a mask equal to plain (bottom-right) causal or full attention."""
    if dropout:
        raise ValueError(f"entmax attention has no attention dropout; got dropout={dropout} (set "
                         "config.attention_dropout=0)")
    if getattr(module, "sliding_window", None) is not None:
        raise ValueError(f"sliding-window attention is not supported; got sliding_window={module.sliding_window}")
    if attention_mask is None:
        return
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if allowed.shape[-2:] == (seqlen_q, seqlen_k):
        rows = torch.arange(seqlen_q, device=allowed.device)[:, None] + (seqlen_k - seqlen_q)
        plain = rows >= torch.arange(seqlen_k, device=allowed.device) if causal else torch.ones_like(allowed[0, 0])
        if bool((allowed == plain).all()):
            return
    raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} is not plain "
                     f"{'causal' if causal else 'full'} attention (padding or packed sequences): entmax attention "
                     "implementations take no masks; pack the documents and use adasplash_varlen_func")


def _make_forward(attend, sequence_parallel: bool):
    """A transformers attention function: (module, query, key, value, attention_mask, scaling, dropout)
    with query (b, heads_q, s, d), key and value (b, heads_kv, s_k, d) -> ((b, s, heads_q, d), None)."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
        _check_plain(module, None if sequence_parallel else attention_mask, dropout, causal, query.shape[2],
                     key.shape[2])
        alpha = getattr(getattr(module, "config", None), "entmax_alpha", DEFAULT_ALPHA)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
        extra = {"group": _sequence_parallel_group} if sequence_parallel else {}
        return attend(q, k, v, alpha=alpha, causal=causal, softmax_scale=scaling, **extra), None

    return forward


def _sequence_parallel_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                            attention_mask=None, **kwargs):
    """Mask builder of the sequence-parallel names: shapes are local there, so no causal mask is
    built (the attention knows the global positions); a 2D padding mask with zeros raises."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padding masks are not supported by sequence-parallel entmax attention; pack the documents "
                         "and use ring_adasplash_varlen_func")
    return None


def implementations() -> dict:
    """Name -> (attention function, mask builder) for every implementation ``register`` adds."""
    from transformers.masking_utils import sdpa_mask

    from ..parallel import ring_adasplash_func, ulysses_adasplash_func, zigzag_ring_adasplash_func

    parallel = {"adasplash_ring": ring_adasplash_func, "adasplash_zigzag": zigzag_ring_adasplash_func,
                "adasplash_ulysses": ulysses_adasplash_func}
    found = {"adasplash": (_make_forward(adasplash_func, False), sdpa_mask)}
    found.update({name: (_make_forward(fn, True), _sequence_parallel_mask) for name, fn in parallel.items()})
    return found


def register() -> list[str]:
    """Add the implementations to transformers' ``AttentionInterface`` and ``AttentionMaskInterface``;
    returns their names. "adasplash" builds masks as "sdpa" does: None for plain causal or full
    attention, so only real padding/packing reaches the check (and raises)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("register() needs Hugging Face transformers: pip install transformers") from exc
    for name, (attention, mask) in implementations().items():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
    return list(implementations())
