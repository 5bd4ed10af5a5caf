"""Integrations with other frameworks; each imports its framework only when called.

``deepspeed_distributed_attention``: DeepSpeed-Ulysses ``DistributedAttention`` around entmax attention
(``deepspeed_adasplash_func``: the same with the call shape of ``parallel.ring_adasplash_func``).
``register_transformers``: entmax attention implementations for Hugging Face transformers models.
"""
from .deepspeed import deepspeed_adasplash_func, deepspeed_distributed_attention
from .transformers import register as register_transformers
from .transformers import set_sequence_parallel_group

__all__ = ["deepspeed_adasplash_func", "deepspeed_distributed_attention", "register_transformers",
           "set_sequence_parallel_group"]
