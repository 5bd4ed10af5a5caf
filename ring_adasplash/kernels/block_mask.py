"""Block sparsity of one attention call as one inspectable object."""
from __future__ import annotations

import torch


class BlockMask:
    """Which (query tile, key tile) pairs hold any nonzero probability.

    ``nonzero``: (batch, heads, num_query_tiles, num_key_tiles) bool; ``visible``: (num_query_tiles,
    num_key_tiles) bool, tiles with any pair the causal/document rule allows. Tiles are
    ``block_m`` queries by ``block_n`` keys.
    """

    def __init__(self, nonzero: torch.Tensor, visible: torch.Tensor, block_m: int, block_n: int,
                 seqlen_q: int, seqlen_k: int):
        self.nonzero, self.visible = nonzero, visible
        self.block_m, self.block_n = block_m, block_n
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k

    @property
    def shape(self) -> tuple:
        """(batch, heads, seqlen_q, seqlen_k): the attention matrix this mask covers."""
        return (*self.nonzero.shape[:2], self.seqlen_q, self.seqlen_k)

    def sparsity(self) -> float:
        """Fraction of visible tiles that are all zero (causal-masked tiles are not counted)."""
        visible = self.visible.expand_as(self.nonzero)
        total = int(visible.sum())
        return 1.0 - int((self.nonzero & visible).sum()) / total if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """(batch, heads, seqlen_q, seqlen_k) bool: True inside nonzero tiles. Small inputs only."""
        dense = self.nonzero.repeat_interleave(self.block_m, 2).repeat_interleave(self.block_n, 3)
        return dense[..., : self.seqlen_q, : self.seqlen_k]

    def __repr__(self) -> str:
        b, h, nq, nk = self.nonzero.shape
        return (f"BlockMask(shape={self.shape}, tiles={nq}x{nk} of {self.block_m}x{self.block_n}, "
                f"sparsity={self.sparsity():.2%}, nonzero_tiles={int(self.nonzero.sum())})")
