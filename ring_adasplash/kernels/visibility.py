"""Which keys each query may see, as six small integer vectors.

Key ``j`` is visible to query ``i`` iff ``q_doc[i] == k_doc[j]``, ``k_pos[j] <= q_limit[i]`` and
``k_win_pos[j] >= q_first[i]``. One rule covers every layout the library needs: bottom-right causal
on one device, global positions of a ring shard or a zigzag shard, packed documents (varlen),
padded keys (a document of their own), sliding windows (``q_first``) and attention sinks (keys
whose ``k_win_pos`` is past every window's start). The vectors are O(sequence) and shared by the
batch, so kernels never materialise an (Sq, Sk) mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NO_LIMIT = 2**30  # q_limit of a non-causal query: every key position is below it


@dataclass(frozen=True)
class Visibility:
    """Visibility rule of one query block against one key block (all int32, 1-D).

    ``q_first`` defaults to no window (every key position is at or above it) and ``k_win_pos`` to
    ``k_pos``."""

    q_limit: torch.Tensor  # (Sq,) largest key position the query sees
    q_doc: torch.Tensor  # (Sq,) document id of the query
    k_pos: torch.Tensor  # (Sk,) position of the key (global, or within its document)
    k_doc: torch.Tensor  # (Sk,) document id of the key
    q_first: torch.Tensor | None = None  # (Sq,) smallest key position the query sees (a window)
    k_win_pos: torch.Tensor | None = None  # (Sk,) the position the window test reads: NO_LIMIT for a sink

    def __post_init__(self):
        if self.q_first is None:
            object.__setattr__(self, "q_first", torch.full_like(self.q_limit, -NO_LIMIT))
        if self.k_win_pos is None:  # a tensor of its own: autograd.Function inputs must not repeat under compile
            object.__setattr__(self, "k_win_pos", self.k_pos.clone())

    @property
    def seqlen_q(self) -> int:
        return self.q_limit.shape[0]

    @property
    def seqlen_k(self) -> int:
        return self.k_pos.shape[0]

    def vectors(self) -> tuple:
        """The six vectors, in the order of the fields (what custom ops and caches take)."""
        return (self.q_limit, self.q_doc, self.k_pos, self.k_doc, self.q_first, self.k_win_pos)

    def with_keys(self, k_pos: torch.Tensor, k_doc: torch.Tensor | None = None,
                  k_win_pos: torch.Tensor | None = None) -> "Visibility":
        """The same queries against another key block (a ring shard arriving)."""
        if k_doc is None:
            k_doc = torch.zeros_like(k_pos)
        k_win_pos = None if k_win_pos is None else k_win_pos.to(torch.int32)
        return Visibility(self.q_limit, self.q_doc, k_pos.to(torch.int32), k_doc.to(torch.int32), self.q_first,
                          k_win_pos)

    def queries(self, start: int, stop: int) -> "Visibility":
        """The rule of the queries [start, stop) against the same keys (a chunk of the queries)."""
        return Visibility(self.q_limit[start:stop], self.q_doc[start:stop], self.k_pos, self.k_doc,
                          self.q_first[start:stop], self.k_win_pos)

    def dense(self) -> torch.Tensor:
        """(Sq, Sk) bool matrix; for tests and small inputs only."""
        rows = torch.arange(self.seqlen_q, device=self.q_limit.device)[:, None]
        return self.pairs(rows, torch.arange(self.seqlen_k, device=self.k_pos.device)[None, :])

    def pairs(self, rows, keys) -> torch.Tensor:
        """Whether query ``rows`` sees key ``keys`` (index tensors that broadcast against each other)."""
        return ((self.k_pos[keys] <= self.q_limit[rows]) & (self.k_win_pos[keys] >= self.q_first[rows])
                & (self.q_doc[rows] == self.k_doc[keys]))

    def to(self, device) -> "Visibility":
        return Visibility(*(t.to(device) for t in self.vectors()))


def window_positions(k_pos: torch.Tensor, k_in_doc: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """``Visibility.k_win_pos``: each key's position, or ``NO_LIMIT`` for the first ``sink_tokens``
    of its document (``k_in_doc``: the key's rank there), which stay visible past any window."""
    return torch.where(k_in_doc < sink_tokens, NO_LIMIT, k_pos).to(torch.int32)


def windowed(vis: Visibility, centre: torch.Tensor, window_size: tuple, sink_tokens: int,
              k_in_doc: torch.Tensor | None = None) -> Visibility:
    """``vis`` with flash-attn's ``window_size = (left, right)`` (-1: unbounded): the query whose
    aligned key position is ``centre`` (its own position, bottom-right aligned) sees keys from
    ``centre - left`` to ``centre + right``, within what ``vis`` allows; the first ``sink_tokens``
    keys of each sequence or document (``k_in_doc``: their rank there; default ``k_pos``) stay
    visible past the window's start."""
    left, right = window_size
    if left < 0 and right < 0 and sink_tokens == 0:
        return vis
    centre = centre.to(torch.int64)
    q_limit, q_first = vis.q_limit.to(torch.int64), torch.full_like(centre, -NO_LIMIT)
    if right >= 0:
        q_limit = torch.minimum(q_limit, centre + right)
    if left >= 0:
        q_first = centre - left
    k_win_pos = window_positions(vis.k_pos, vis.k_pos if k_in_doc is None else k_in_doc, sink_tokens)
    return Visibility(q_limit.clamp(-1, NO_LIMIT).to(torch.int32), vis.q_doc, vis.k_pos, vis.k_doc,
                      q_first.clamp(-NO_LIMIT, NO_LIMIT).to(torch.int32), k_win_pos)


NO_WINDOW = (-1, -1)


def positional_visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, diagonal: int = 0) -> Visibility:
    """Queries at positions ``q_pos`` see keys at ``k_pos`` with ``k <= q + diagonal`` when causal.

    ``diagonal = Sk - Sq`` gives flash-attn's bottom-right alignment on one device; a ring shard
    passes global positions and ``diagonal = 0``.
    """
    device = q_pos.device
    q_limit = (q_pos.to(torch.int64) + diagonal).clamp(-1, NO_LIMIT) if causal else torch.full_like(q_pos, NO_LIMIT)
    return Visibility(
        q_limit.to(torch.int32),
        torch.zeros(q_pos.shape[0], dtype=torch.int32, device=device),
        k_pos.to(torch.int32),
        torch.zeros(k_pos.shape[0], dtype=torch.int32, device=device),
    )


def causal_visibility(seqlen_q: int, seqlen_k: int, causal: bool, device, window_size: tuple = NO_WINDOW,
                      sink_tokens: int = 0) -> Visibility:
    """One device, bottom-right aligned: query ``i`` sees keys ``j <= i + Sk - Sq`` (causal), within
    ``window_size`` of ``i + Sk - Sq``, or among the first ``sink_tokens`` (``windowed``)."""
    q_pos = torch.arange(seqlen_q, dtype=torch.int32, device=device)
    k_pos = torch.arange(seqlen_k, dtype=torch.int32, device=device)
    vis = positional_visibility(q_pos, k_pos, causal, diagonal=seqlen_k - seqlen_q)
    return windowed(vis, q_pos.to(torch.int64) + seqlen_k - seqlen_q, window_size, sink_tokens)


def padded_visibility(key_padding_mask: torch.Tensor, seqlen_q: int, causal: bool, window_size: tuple = NO_WINDOW,
                      sink_tokens: int = 0) -> Visibility:
    """A batch with padded keys as one sequence of ``batch * seqlen_q`` queries and ``batch * seqlen_k``
    keys (the batch entries side by side, each a document): query ``i`` of entry ``b`` sees key ``j``
    of entry ``b`` when ``key_padding_mask[b, j]`` (True: kept) and, under causal, ``j <= i + Sk - Sq``
    (bottom-right aligned, in the entry's own positions, padding included). A padded key belongs
    to no document, so tiles made only of padding hold no visible pair and are never read. Windows
    count positions with the padding; sinks are the first ``sink_tokens`` kept keys."""
    batch, seqlen_k = key_padding_mask.shape
    device = key_padding_mask.device
    entry = torch.arange(batch, dtype=torch.int32, device=device)
    q_pos = torch.arange(seqlen_q, dtype=torch.int64, device=device)
    if causal:
        q_limit = (q_pos + seqlen_k - seqlen_q).clamp(-1, NO_LIMIT)
    else:
        q_limit = torch.full_like(q_pos, NO_LIMIT)
    k_doc = torch.where(key_padding_mask, entry[:, None], -1)
    vis = Visibility(q_limit.to(torch.int32).repeat(batch), entry.repeat_interleave(seqlen_q),
                     torch.arange(seqlen_k, dtype=torch.int32, device=device).repeat(batch),
                     k_doc.to(torch.int32).flatten())
    kept_rank = key_padding_mask.to(torch.int64).cumsum(1) - 1
    return windowed(vis, (q_pos + seqlen_k - seqlen_q).repeat(batch), window_size, sink_tokens, kept_rank.flatten())


def packed_visibility(position_ids: torch.Tensor, causal: bool, window_size: tuple = NO_WINDOW,
                      sink_tokens: int = 0) -> Visibility:
    """Documents packed into the rows of a batch and marked by ``position_ids`` (batch, seqlen)
    that restart at 0, as transformers marks them: the rows side by side as one sequence, and a
    new document wherever a row's positions restart (or a new row begins). A token sees the
    earlier tokens (causal) of its own document, within ``window_size``; the first
    ``sink_tokens`` of each document are its sinks. Tensor ops only (no host read), so it traces."""
    batch, seqlen = position_ids.shape
    device = position_ids.device
    starts = (position_ids == 0).to(torch.int64)
    starts[:, 0] = 1
    doc = (starts.cumsum(1) + torch.arange(batch, device=device)[:, None] * seqlen).flatten().to(torch.int32)
    index = torch.arange(batch * seqlen, device=device, dtype=torch.int64)
    q_limit = index if causal else torch.full_like(index, NO_LIMIT)
    vis = Visibility(q_limit.to(torch.int32), doc, index.to(torch.int32), doc)
    return windowed(vis, index, window_size, sink_tokens, position_ids.flatten().to(torch.int64))


def _doc_ids_and_offsets(cu_seqlens: torch.Tensor, total: int):
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[:-1][doc]
    return doc, pos, lengths


def varlen_visibility(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool,
                      window_size: tuple = NO_WINDOW, sink_tokens: int = 0) -> Visibility:
    """Packed documents: a query sees keys of its own document, bottom-right aligned per document
    (causal and ``window_size``); sinks are the first ``sink_tokens`` keys of each document."""
    total_q, total_k = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    q_doc, q_pos, len_q = _doc_ids_and_offsets(cu_seqlens_q, total_q)
    k_doc, k_pos, len_k = _doc_ids_and_offsets(cu_seqlens_k, total_k)
    centre = q_pos + (len_k - len_q)[q_doc]
    q_limit = centre.clamp(-1, NO_LIMIT) if causal else torch.full_like(q_pos, NO_LIMIT)
    vis = Visibility(q_limit.to(torch.int32), q_doc.to(torch.int32), k_pos.to(torch.int32), k_doc.to(torch.int32))
    return windowed(vis, centre, window_size, sink_tokens)


def tile_bounds(vis: Visibility, block_m: int, block_n: int):
    """Per-tile summaries that let a kernel skip a (query tile, key tile) with no visible pair.

    Returns ``q_tiles`` (nQ, 4) = (max q_limit, min q_doc, max q_doc, min q_first) and ``k_tiles``
    (nK, 4) = (min k_pos, min k_doc, max k_doc, max k_win_pos). A pair with
    ``min k_pos > max q_limit``, ``max k_win_pos < min q_first`` or disjoint document ranges has no
    visible key. Padding rows repeat the last row, so bounds stay tight.
    """

    def pad_to(x, block):
        n = x.shape[0]
        rem = (-n) % block
        return torch.cat([x, x[-1:].expand(rem)]) if rem and n else x

    ql = pad_to(vis.q_limit, block_m).view(-1, block_m)
    qd = pad_to(vis.q_doc, block_m).view(-1, block_m)
    qf = pad_to(vis.q_first, block_m).view(-1, block_m)
    kp = pad_to(vis.k_pos, block_n).view(-1, block_n)
    kd = pad_to(vis.k_doc, block_n).view(-1, block_n)
    kw = pad_to(vis.k_win_pos, block_n).view(-1, block_n)
    q_tiles = torch.stack([ql.amax(1), qd.amin(1), qd.amax(1), qf.amin(1)], 1).to(torch.int32).contiguous()
    k_tiles = torch.stack([kp.amin(1), kd.amin(1), kd.amax(1), kw.amax(1)], 1).to(torch.int32).contiguous()
    return q_tiles, k_tiles


def tile_visible(vis: Visibility, block_m: int, block_n: int) -> torch.Tensor:
    """(nQ, nK) bool: the tile may hold a visible pair (exact for contiguous causal layouts)."""
    q_tiles, k_tiles = tile_bounds(vis, block_m, block_n)
    return (
        (k_tiles[None, :, 0] <= q_tiles[:, None, 0])
        & (k_tiles[None, :, 1] <= q_tiles[:, None, 2])
        & (q_tiles[:, None, 1] <= k_tiles[None, :, 2])
        & (k_tiles[None, :, 3] >= q_tiles[:, None, 3])
    )


def first_true(mask: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True along the last dim, ``default`` where none."""
    pos = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, pos, default).amin(-1)


def true_span(mask: torch.Tensor):
    """Per row of ``mask`` (rows, n) bool (int64, (rows,) each): [lo, hi) from its first True to
    one past its last; lo == hi where there is none."""
    n = mask.shape[-1]
    lo = first_true(mask, n)
    hi = torch.where(mask, torch.arange(n, device=mask.device) + 1, 0).amax(-1)
    return torch.minimum(lo, hi), hi


def key_tile_span(vis: Visibility, block_m: int, block_n: int):
    """Per query tile (int64, (nQ,) each), key tiles [lo, hi) spanning every tile that may hold a
    visible pair (``tile_visible``); lo == hi where there is none."""
    return true_span(tile_visible(vis, block_m, block_n))


def keys_seen_by(rows: torch.Tensor, vis: Visibility, heads_kv: int) -> torch.Tensor:
    """(B, Sk, Hkv) bool: the keys that at least one of ``rows`` (B, Hq, Sq) bool sees (a key head
    through any query head of its group), exactly, with no (Sq, Sk) matrix. Key j is seen when
    some marked row r of its document has ``q_first[r] <= k_win_pos[j]`` and ``q_limit[r] >=
    k_pos[j]``: with the rows sorted by (document, q_first), the rows of j's document that pass
    the first test are a run ending at a binary search for j, and the running max of their
    ``q_limit`` decides the second. Document ids are arbitrary integers, so each goes to the slot
    of its first place in the sorted ids of both sides. (The PyTorch backend's; the Triton
    backend marks these keys in a kernel, ``triton_backward.nan_keys_kernel``.)"""
    docs = torch.cat([vis.q_doc, vis.k_doc]).sort().values
    q_slot = torch.searchsorted(docs, vis.q_doc.contiguous()).to(torch.int64)
    k_slot = torch.searchsorted(docs, vis.k_doc.contiguous()).to(torch.int64)
    # (slot, value) in one int64: positions lie within +-2^30, so value + 2^31 fits in 32 bits
    slot_bits, offset = 32, 2**31

    def encode(slot, value):
        return (slot << slot_bits) + (value.to(torch.int64) + offset)

    order = encode(q_slot, vis.q_first).expand_as(rows).sort(-1)
    # unmarked rows keep their place but the lowest limit, which no key position reaches
    limits = torch.where(rows, vis.q_limit.to(torch.int64), -offset).gather(-1, order.indices)
    reach = encode(q_slot[order.indices], limits).cummax(-1).values
    key = encode(k_slot, vis.k_win_pos).expand(*rows.shape[:2], -1).contiguous()
    last = torch.searchsorted(order.values.contiguous(), key, right=True) - 1
    found = reach.gather(-1, last.clamp(min=0))
    seen = ((last >= 0) & (found >> slot_bits == k_slot)
            & ((found & (2**slot_bits - 1)) - offset >= vis.k_pos.to(torch.int64)))
    batch, heads = rows.shape[:2]
    return seen.view(batch, heads_kv, heads // heads_kv, -1).any(2).transpose(1, 2)
