"""Opt-in counters: block sparsity, support sizes and bytes sent, read inside ``record()``.

    with ring_adasplash.telemetry.record() as t:
        out = ring_adasplash_func(q, k, v)
    print(t.block_sparsity, t.bytes_sent, t.dense_ring_bytes)
    print(t.block_masks[0])  # the last call's tiles with p > 0, as a BlockMask
    print(t.tile_state_bytes, t.saved_tile_bytes)  # per-tile state a forward held, and kept

Nothing is counted (and no device sync happens) outside a ``record()`` block.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .kernels import algorithm
from .kernels.algorithm import held_bytes

_recorders: list = []


@dataclass
class Telemetry:
    """Counters summed over every attention call inside the ``record()`` block."""

    visible_tiles: int = 0  # (query tile, key tile) pairs with any visible pair, all heads
    nonzero_tiles: int = 0  # of those, tiles holding any p > 0
    remote_visible_tiles: int = 0  # visible tiles whose keys live on another rank (rings)
    remote_nonzero_tiles: int = 0  # of those, tiles holding any p > 0
    support_sum: float = 0.0  # sum over rows of the number of keys with p > 0
    rows: int = 0  # query rows counted (rows with a visible key)
    bytes_sent: int = 0  # bytes this rank sent in ring exchanges of K/V (and dK/dV)
    dense_ring_bytes: int = 0  # bytes a dense ring would have sent for the same exchanges
    calls: int = 0
    events: list = field(default_factory=list)  # strategy of each attention call
    bytes_by_pass: dict = field(default_factory=dict)  # pass name -> [bytes sent, dense-ring bytes]
    block_masks: list = field(default_factory=list)  # the last call's ``BlockMask`` per key block (p > 0)
    # the largest over the calls, on this rank: bytes of per-tile state (tile gaps, masks, tile lists
    # of every key block) held at once in a forward, and of the masks a forward keeps for its backward
    tile_state_bytes: int = 0
    saved_tile_bytes: int = 0

    @property
    def block_sparsity(self) -> float:
        """Fraction of visible tiles that are all zero."""
        return 1.0 - self.nonzero_tiles / self.visible_tiles if self.visible_tiles else 0.0

    @property
    def remote_block_sparsity(self) -> float:
        """Fraction of visible tiles against other ranks' key blocks that are all zero (rings)."""
        return 1.0 - self.remote_nonzero_tiles / self.remote_visible_tiles if self.remote_visible_tiles else 0.0

    @property
    def mean_support(self) -> float:
        """Mean number of keys with p > 0 per query row."""
        return self.support_sum / self.rows if self.rows else 0.0

    @property
    def bytes_saved(self) -> float:
        """1 - bytes sent / dense-ring bytes."""
        return 1.0 - self.bytes_sent / self.dense_ring_bytes if self.dense_ring_bytes else 0.0


def enabled() -> bool:
    return bool(_recorders)


@contextlib.contextmanager
def record():
    """Count inside this block; yields the ``Telemetry`` being filled."""
    t = Telemetry()
    _recorders.append(t)
    algorithm.count_tile_state = True
    try:
        yield t
    finally:
        _recorders.remove(t)
        algorithm.count_tile_state = bool(_recorders)


def add(**counts) -> None:
    for t in _recorders:
        for name, value in counts.items():
            setattr(t, name, getattr(t, name) + value)


def add_bytes(pass_name: str, sent: int, dense: int) -> None:
    """Bytes one exchange sent, against what a dense ring would send for it."""
    add(bytes_sent=sent, dense_ring_bytes=dense)
    for t in _recorders:
        entry = t.bytes_by_pass.setdefault(pass_name, [0, 0])
        entry[0] += sent
        entry[1] += dense


def log_forward(fwd, strategy: str, local_block: int | None = None, saved_bytes: int | None = None) -> None:
    """Add one forward's sparsity and support counts (``fwd``: an ``algorithm.ForwardResult``,
    whose block masks hold the tiles with p > 0 per key block); key blocks other than
    ``local_block`` count as remote. ``saved_bytes``: what the caller keeps of the tiles for the
    backward, where it is not ``fwd``'s masks (one device keeps them as bits)."""
    if not _recorders:
        return
    visible = [mask.visible_tiles() for mask in fwd.block_masks]
    nonzero = [mask.nonzero_tiles() for mask in fwd.block_masks]
    remote = [i for i in range(len(visible)) if local_block is not None and i != local_block]
    has_keys = torch.isfinite(fwd.tau)
    add(visible_tiles=sum(visible), nonzero_tiles=sum(nonzero), support_sum=float(fwd.support[has_keys].sum()),
        rows=int(has_keys.sum()), calls=1, remote_visible_tiles=sum(visible[i] for i in remote),
        remote_nonzero_tiles=sum(nonzero[i] for i in remote))
    if saved_bytes is None:
        saved_bytes = held_bytes([t for mask in (*fwd.block_masks, *fwd.read_masks) for t in mask.held_tensors()])
    for t in _recorders:
        t.events.append(strategy)
        t.block_masks = list(fwd.block_masks)
        t.tile_state_bytes = max(t.tile_state_bytes, fwd.tile_state_bytes)
        t.saved_tile_bytes = max(t.saved_tile_bytes, saved_bytes)
