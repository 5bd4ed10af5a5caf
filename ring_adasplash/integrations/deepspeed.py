"""DeepSpeed-Ulysses with entmax attention: DeepSpeed's own ``DistributedAttention`` does the
all-to-alls, :func:`ring_adasplash.adasplash_func` the full-sequence attention on each head share.

    attn = deepspeed_distributed_attention(alpha=1.5, group=sp_group)      # layout "bshd"
    out = attn(q, k, v, 0)          # q, k, v: (batch, seqlen_local, heads, head_dim); 0 = batch axis

Layouts and the all-to-all axes handed to DeepSpeed:
    "bshd": (batch, seq, heads, dim); scatter_idx=2 (heads), gather_idx=1 (seq), batch_dim_idx=0
    "sbhd": (seq, batch, heads, dim); scatter_idx=2 (heads), gather_idx=0 (seq), batch_dim_idx=1
``forward(query, key, value, batch_dim_idx, rotary_pos_emb=None)`` is DeepSpeed's signature (0.19);
``BATCH_DIM[layout]`` gives the ``batch_dim_idx`` to pass. Each rank holds a contiguous sequence
shard. DeepSpeed splits key/value heads like query heads, so ``heads_kv`` must be a multiple of the
group size (for fewer key/value heads use ``parallel.ulysses_adasplash_func``, which replicates them).
"""
from __future__ import annotations

import torch

from ..checks import check_alpha
from ..functional import adasplash_func

LAYOUTS = {"bshd": (2, 1), "sbhd": (2, 0)}  # layout -> (scatter_idx, gather_idx)
BATCH_DIM = {"bshd": 0, "sbhd": 1}


class EntmaxLocalAttention(torch.nn.Module):
    """Full-sequence entmax attention on the tensors DeepSpeed hands over after its all-to-all:
    (batch, seq, heads_share, dim) for "bshd", (seq, batch, heads_share, dim) for "sbhd";
    returns the same layout."""

    def __init__(self, alpha: float = 1.5, causal: bool = True, softmax_scale: float | None = None,
                 layout: str = "bshd"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(LAYOUTS)}; got {layout!r}")
        self.alpha, self.causal, self.softmax_scale, self.layout = check_alpha(alpha), causal, softmax_scale, layout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layout == "sbhd":
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out = adasplash_func(q, k, v, self.alpha, self.causal, self.softmax_scale)
        return out.transpose(0, 1).contiguous() if self.layout == "sbhd" else out

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, causal={self.causal}, softmax_scale={self.softmax_scale}, layout={self.layout}"


def deepspeed_distributed_attention(alpha: float = 1.5, causal: bool = True, softmax_scale: float | None = None,
                                    group=None, layout: str = "bshd"):
    """``deepspeed.sequence.layer.DistributedAttention`` around :class:`EntmaxLocalAttention`.

    Args:
        alpha, causal, softmax_scale: as in :func:`ring_adasplash.adasplash_func` (causal over
            global positions).
        group: the sequence-parallel process group (default: world).
        layout: "bshd" or "sbhd" (module docstring); call the result with ``BATCH_DIM[layout]``.
    DeepSpeed's communication layer is set up over the already initialised ``torch.distributed``
    when it is not yet (``deepspeed.init_distributed``), which DeepSpeed training does anyway.
    """
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as exc:
        raise ImportError("deepspeed_distributed_attention needs DeepSpeed: pip install deepspeed") from exc
    local = EntmaxLocalAttention(alpha, causal, softmax_scale, layout)
    if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    scatter_idx, gather_idx = LAYOUTS[layout]
    return DistributedAttention(local, group, scatter_idx=scatter_idx, gather_idx=gather_idx)


def deepspeed_adasplash_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float = 1.5,
                             causal: bool = True, softmax_scale: float | None = None, group=None) -> torch.Tensor:
    """Functional form with the call shape of ``parallel.ring_adasplash_func``: q (batch,
    seqlen_local, heads_q, head_dim), k and v (batch, seqlen_local, heads_kv, head_dim), rank r
    holding tokens ``[r*S/P, (r+1)*S/P)``; returns (batch, seqlen_local, heads_q, head_dim). Builds
    the (light) ``DistributedAttention`` module on every call."""
    attention = deepspeed_distributed_attention(alpha, causal, softmax_scale, group, layout="bshd")
    return attention(q, k, v, BATCH_DIM["bshd"])
