"""Synthetic associative recall: a task that only a model reading far back can solve.

The first half of each sequence holds ``pairs`` key-value bigrams ``k v``, each written
``repeats`` times at random places among filler tokens. The second half holds ``queries``
questions ``k ?``, scattered among filler: the target at a queried key is its value, and
the token after it is a placeholder, so an answer is never shown. The answers therefore
live only in the first half, on average ``seqlen / 2`` tokens back, and nothing nearby
predicts them. Loss and accuracy count the answers only; chance accuracy is
``1 / value_tokens``, and copying a random value of the context scores ``1 / pairs``.

From random initialisation a model does not learn this at thousands of tokens: a query's
attention is spread over the whole row, so the few keys that match it get almost no gradient,
and recall stays at ``1 / pairs``. Learned on short sequences first (``launch/train.py
--curriculum``), the same lookup carries over to long ones; every length then needs the same
token ids, hence ``key_tokens`` as an argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # target of every token that is not an answer


@dataclass(frozen=True)
class RecallTask:
    """Vocabulary layout: ``[filler | keys | values | placeholder]``."""

    seqlen: int
    pairs: int
    repeats: int
    queries: int
    filler_tokens: int = 16
    value_tokens: int = 64
    key_tokens: int = 64

    def __post_init__(self):
        if self.key_tokens < self.pairs:  # the keys of one sequence are drawn without replacement
            raise ValueError(f"key_tokens ({self.key_tokens}) must be at least pairs ({self.pairs})")

    @classmethod
    def for_seqlen(cls, seqlen: int, key_tokens: int | None = None) -> "RecallTask":
        """A quarter of each half carries pairs or queries (below 256 tokens, where each pair is
        written 4 times, more of the first half); the rest is filler. ``key_tokens`` (default:
        max(64, 2 pairs)) fixes the vocabulary, for tasks of several lengths that one model
        learns in turn."""
        pairs = max(4, seqlen // 128)
        return cls(seqlen=seqlen, pairs=pairs, repeats=max(4, seqlen // (16 * pairs)), queries=seqlen // 8,
                   key_tokens=key_tokens or max(64, 2 * pairs))

    @property
    def placeholder(self) -> int:
        return self.filler_tokens + self.key_tokens + self.value_tokens

    @property
    def vocab_size(self) -> int:
        return self.placeholder + 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, targets)``, both ``(batch, seqlen)`` int64; targets are IGNORE off answers."""
        half = self.seqlen // 2
        slots = half // 2  # 2-token slots per half; each holds one bigram or filler
        if self.seqlen % 4 or max(self.pairs * self.repeats, self.queries) > slots:
            raise ValueError(f"seqlen {self.seqlen} must be a multiple of 4 with room for the pairs and queries")
        key_base, value_base = self.filler_tokens, self.filler_tokens + self.key_tokens

        tokens = torch.randint(0, self.filler_tokens, (batch, self.seqlen), generator=generator)
        targets = torch.full((batch, self.seqlen), IGNORE, dtype=torch.long)
        rows = torch.arange(batch)[:, None]
        keys = key_base + _distinct(batch, self.key_tokens, self.pairs, generator)
        values = value_base + torch.randint(0, self.value_tokens, (batch, self.pairs), generator=generator)
        written = 2 * _distinct(batch, slots, self.pairs * self.repeats, generator)
        pair = torch.arange(self.pairs * self.repeats) % self.pairs
        tokens[rows, written], tokens[rows, written + 1] = keys[:, pair], values[:, pair]
        asked = half + 2 * _distinct(batch, slots, self.queries, generator)
        pair = torch.randint(0, self.pairs, (batch, self.queries), generator=generator)
        tokens[rows, asked], tokens[rows, asked + 1] = keys.gather(1, pair), self.placeholder
        targets[rows, asked] = values.gather(1, pair)
        return tokens, targets


def _distinct(batch: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, k)``: each row k distinct integers of ``range(n)`` in random order (the first k of
    a random permutation, for all rows at once: a loop over the rows was a large part of each
    training step at 64 tokens, where a step holds a thousand sequences)."""
    return torch.rand(batch, n, generator=generator, dtype=torch.float64).argsort(dim=1)[:, :k]
