"""Block sparsity as one inspectable object: which (query tile, key tile) pairs a pass reads.

The forward builds one per key block and pass (the tiles that may hold p > 0, then the tiles that
do); the backward reads the forward's last one, telemetry counts it, and the Triton kernels read
its tile lists (per query tile the key tiles to visit, and per key tile the query tiles, as
FlexAttention's ``kv_indices`` / ``q_indices``), built once and kept.
"""
from __future__ import annotations

import math

import torch


class BlockMask:
    """``tiles``: (batch, heads, num_query_tiles, num_key_tiles) bool, the tiles to read (or that
    hold any nonzero probability); ``visible``: (num_query_tiles, num_key_tiles) bool, tiles with
    any pair the causal/document rule allows (None: not known, every tile counts). Tiles are
    ``block_m`` queries by ``block_n`` keys of a ``seqlen_q`` x ``seqlen_k`` attention matrix.
    ``BlockMask.from_bits`` holds the tiles as bits (``pack_tiles``) instead: an eighth of the
    memory, and what a long one-device call keeps from its forward to its backward; the tile lists
    are then built from the bits, and ``tiles`` unpacks them on each read."""

    def __init__(self, tiles: torch.Tensor, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int,
                 visible: torch.Tensor | None = None):
        if tiles.dtype != torch.bool or tiles.dim() != 4:
            raise ValueError(f"tiles must be a 4-dim bool tensor (batch, heads, nQ, nK); got {tiles.dtype} "
                             f"of shape {tuple(tiles.shape)}")
        self._hold(tiles, None, tuple(tiles.shape), block_m, block_n, seqlen_q, seqlen_k, visible)

    def _hold(self, tiles, bits, grid: tuple, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int,
              visible: torch.Tensor | None) -> None:
        """Either ``tiles`` (bool) or ``bits`` (``pack_tiles``), of ``grid`` (B, H, nQ, nK) tiles."""
        self._tiles, self._bits, self.grid = tiles, bits, grid
        self.visible = visible
        self.block_m, self.block_n = block_m, block_n
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k
        self._lists: dict = {}

    @classmethod
    def from_bits(cls, bits: torch.Tensor, num_key_tiles: int, block_m: int, block_n: int, seqlen_q: int,
                  seqlen_k: int, visible: torch.Tensor | None = None) -> "BlockMask":
        """A mask whose tiles are ``bits`` (batch, heads, nQ, ceil(``num_key_tiles`` / 8)) uint8, as
        ``pack_tiles`` gives them (not copied: writing into ``bits`` changes the mask)."""
        width = packed_width(num_key_tiles)
        if bits.dtype != torch.uint8 or bits.dim() != 4 or bits.shape[-1] != width:
            raise ValueError(f"bits must be a 4-dim uint8 tensor (batch, heads, nQ, {width}) for "
                             f"{num_key_tiles} key tiles; got {bits.dtype} of shape {tuple(bits.shape)}")
        mask = cls.__new__(cls)
        mask._hold(None, bits, (*bits.shape[:3], num_key_tiles), block_m, block_n, seqlen_q, seqlen_k, visible)
        return mask

    @property
    def tiles(self) -> torch.Tensor:
        """(batch, heads, nQ, nK) bool (unpacked anew on each read where the mask holds bits)."""
        return self._tiles if self._tiles is not None else unpack_tiles(self._bits, self.grid[-1])

    @property
    def bits(self) -> torch.Tensor:
        """The tiles as bits, ``pack_tiles``'s layout (packed anew on each read where the mask
        holds bools)."""
        return self._bits if self._bits is not None else pack_tiles(self._tiles)

    @property
    def shape(self) -> tuple:
        """(batch, heads, seqlen_q, seqlen_k): the attention matrix this mask covers."""
        return (*self.grid[:2], self.seqlen_q, self.seqlen_k)

    def with_tiles(self, tiles: torch.Tensor) -> "BlockMask":
        """Another selection of tiles of the same tiling and visibility."""
        return BlockMask(tiles, self.block_m, self.block_n, self.seqlen_q, self.seqlen_k, self.visible)

    def visible_tiles(self) -> int:
        """Visible tiles over every batch entry and head."""
        if self.visible is None:
            return math.prod(self.grid)
        return _count(self.visible) * self.grid[0] * self.grid[1]

    def nonzero_tiles(self) -> int:
        """Selected tiles that are visible."""
        if self._bits is not None:
            bits = self._bits if self.visible is None else self._bits & pack_tiles(self.visible)
            return int(popcount(bits).sum(-1, dtype=torch.int32).sum(dtype=torch.int64))
        return _count(self._tiles if self.visible is None else self._tiles & self.visible)

    def sparsity(self) -> float:
        """Fraction of visible tiles not selected (causal-masked tiles are not counted)."""
        total = self.visible_tiles()
        return 1.0 - self.nonzero_tiles() / total if total else 0.0

    def needed_key_tiles(self) -> torch.Tensor:
        """(num_key_tiles,) bool: key tiles that any query tile of any head reads."""
        if self._bits is not None:  # per byte and bit position, whether any row sets it
            rows = self._bits.flatten(0, -2)
            return torch.stack([((rows >> i) & 1).bool().any(0) for i in range(8)], -1).flatten()[: self.grid[-1]]
        return self._tiles.flatten(0, -2).any(0)

    def to_dense(self) -> torch.Tensor:
        """(batch, heads, seqlen_q, seqlen_k) bool: True inside selected tiles. Small inputs only."""
        dense = self.tiles.repeat_interleave(self.block_m, 2).repeat_interleave(self.block_n, 3)
        return dense[..., : self.seqlen_q, : self.seqlen_k]

    def key_tile_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, head, query tile): the number of selected key tiles (B, H, nQ) int32 and their
        indices, ascending, in the first slots of (B, H, nQ, nK) int32. Built once (one launch)."""
        if "keys" not in self._lists:
            from .triton_tiles import tile_lists

            self._lists["keys"] = tile_lists(**self._list_source())
        return self._lists["keys"]

    def query_tile_lists(self, column_spans: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, head, key tile): the selected query tiles, as ``key_tile_lists`` ((B, H, nK)
        counts, (B, H, nK, nQ) indices). Built with the key lists in one launch when neither is.
        ``column_spans``: ``(first, end)`` int32 (nK,) each, the query tiles outside of which no
        key tile has a visible pair (``triton_tiles.tile_lists``): where the lists are built here,
        only those are read."""
        if "queries" not in self._lists:
            from .triton_tiles import tile_lists

            counts, index, counts_t, index_t = tile_lists(**self._list_source(), columns_too=True,
                                                          column_spans=column_spans)
            self._lists.setdefault("keys", (counts, index))
            self._lists["queries"] = (counts_t, index_t)
        return self._lists["queries"]

    def _held_tiles(self) -> torch.Tensor:
        """The tensor the tiles are held in: the bools, or the bits."""
        return self._tiles if self._bits is None else self._bits

    def _list_source(self) -> dict:
        """``tile_lists``'s ``mask`` and ``packed_cols``: the bits where the mask holds them."""
        return dict(mask=self._held_tiles(), packed_cols=None if self._bits is None else self.grid[-1])

    def held_tensors(self) -> list:
        """The tensors this mask holds: its tiles (bools or bits), visible tiles and the tile lists
        built so far (for counting the memory of per-tile state)."""
        held = [self._held_tiles()] + ([] if self.visible is None else [self.visible])
        return held + [t for lists in self._lists.values() for t in lists]

    def __repr__(self) -> str:
        b, h, nq, nk = self.grid
        held = "" if self._bits is None else ", as bits"
        return (f"BlockMask(shape={self.shape}, tiles={nq}x{nk} of {self.block_m}x{self.block_n}, "
                f"sparsity={self.sparsity():.2%}, nonzero_tiles={self.nonzero_tiles()}{held})")


def pack_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """``tiles`` (..., nK) bool as bits: (..., ceil(nK / 8)) uint8, key tile ``8 j + i`` in bit ``i``
    of byte ``j`` (what a forward keeps for its backward: an eighth of the bool mask). Each byte
    is the sum of its bits shifted into place, in uint8 (distinct powers of two: no carry): three
    small kernels, where a shift and an or per bit position made some twenty at every forward's
    end. The shifts are made on the device (no copy from the host, which a CUDA graph's capture
    forbids). On a GPU, one launch instead (``triton_tiles.pack_tiles``)."""
    if tiles.is_cuda:
        from .triton_tiles import pack_tiles as pack_on_device

        return pack_on_device(tiles)
    pad = -tiles.shape[-1] % 8
    bits = torch.nn.functional.pad(tiles, (0, pad)) if pad else tiles
    shifts = torch.arange(8, dtype=torch.uint8, device=tiles.device)
    return (bits.unflatten(-1, (-1, 8)).view(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def packed_width(num_key_tiles: int) -> int:
    """Bytes per row of ``num_key_tiles`` key tiles as bits (``pack_tiles``)."""
    return -(-num_key_tiles // 8)


def unpack_tiles(packed: torch.Tensor, num_key_tiles: int) -> torch.Tensor:
    """``pack_tiles``'s inverse: (..., ``num_key_tiles``) bool, contiguous."""
    width = packed_width(num_key_tiles)
    if packed.dtype != torch.uint8 or packed.shape[-1] != width:
        raise ValueError(f"packed must be uint8 with {width} bytes per row for {num_key_tiles} key "
                         f"tiles; got {packed.dtype} of shape {tuple(packed.shape)}")
    tiles = torch.empty((*packed.shape, 8), dtype=torch.bool, device=packed.device)
    for i in range(8):
        tiles[..., i] = (packed >> i) & 1
    tiles = tiles.flatten(-2)
    return tiles if tiles.shape[-1] == num_key_tiles else tiles[..., :num_key_tiles].contiguous()


def popcount(bits: torch.Tensor) -> torch.Tensor:
    """The set bits of each byte of ``bits`` (uint8), as uint8, in uint8 arithmetic throughout (a
    lookup table would index with int64: eight bytes per byte of ``bits``)."""
    bits = bits - ((bits >> 1) & 0x55)
    bits = (bits & 0x33) + ((bits >> 2) & 0x33)
    return (bits + (bits >> 4)) & 0x0F


def _count(mask: torch.Tensor) -> int:
    """The True entries of ``mask``: row sums in int32 first (a bool sum to int64 made torch widen
    the whole mask first: four bytes per tile), then their total in int64."""
    return int(mask.sum(-1, dtype=torch.int32).sum(dtype=torch.int64))
