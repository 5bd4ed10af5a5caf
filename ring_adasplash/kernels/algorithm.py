"""The forward and backward schedule shared by one device and every distributed strategy.

A query block meets its keys as one or more *key blocks* (the whole sequence on one device, a
shard per ring step in a ring). ``KeyBlocks`` hides how blocks arrive; this module says what is
computed on each and how the pieces combine:

    forward  1. max pass on every block (dense Q.K^T: the only dense pass): the row's largest raw
                score, tau floor (first block), tile gaps against max(tau floor, row max - 1), a
                lower bound of tau. Every later pass takes logits relative to that score
                (``stats.Relative``): nothing depends on a constant added to a row's scores
             2. histogram pass (sparse): coarse counts against the row max over all blocks, on
                the tiles that reach the bin of that bound; counts add exactly
             3. bracket tau in two adjacent bins; block mask = tiles with a key above them
             4. alpha 1.5 and 2: fine histogram pass on those tiles (sparse): fine histogram of
                the two bins and exact moments above them; tau in closed form, exact where the
                sub-bin holding tau has at most two keys; POLISH_STEPS Newton sums passes on the
                query tiles of the other rows (one launch for them all with one key block,
                ``backend.newton_polish``); the block mask rebuilt from the exact tau and
                tightened per row.
                Other alpha: NEWTON_STEPS Newton sums passes (sparse) on exact sums
             5. output pass on the block mask (sparse): sum p v, sum u v, sum u; the tiles that
                hold p > 0 become the forward's block mask
    backward one pass on nonzero tiles: dq here, dk and dv of each block handed back to the block

The Newton schedule (``default_schedule``: by default where a query block holds all its keys)
replaces steps 2-4 by Newton steps alone from the max pass's lower bound
(``_newton_schedule_tau``); with one key block and nothing to merge, every step runs in one launch
(``backend.newton_schedule``).

Total: one dense Q.K^T pass in the forward (AdaSplash-2 runs four), every other pass sparse.
Taking the histogram after the global row max is known, rather than per block against each
block's own max, keeps it sparse in a ring too: a far block's own max says nothing about tau.
No autograd and no communication here: callers bring both (``KeyBlocks``, ``LocalReduce``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol

import torch

from . import stats
from .backend import AlphaSplit, Backend, OutputRequest, PartialOutput
from .block_mask import BlockMask, packed_width
from .entmax_spec import EntmaxSpec
from .visibility import Visibility, tile_visible


class KeyBlock(NamedTuple):
    """One key block as a pass sees it: its index (its order in the sequence of blocks), keys
    (B, Sk, Hkv, D), values (None for the passes that read none) and visibility."""

    index: int
    k: torch.Tensor
    v: torch.Tensor | None
    vis: Visibility


class KeyBlocks(Protocol):
    """How a query block meets its key blocks.

    ``sweep`` yields every block, in the same order on every rank; a ring posts the transfer of
    the next block before it yields this one, so the caller's work on a block overlaps it.
    ``needed`` (one ``BlockMask`` per block, or None for all) says which key tiles the pass reads:
    key tiles that no rank needs may arrive as zeros. ``reads_needed``: whether ``sweep`` uses
    ``needed`` at all. ``backward_sweep`` does the same for the backward and takes each block's
    dk and dv back (``GradientSweep``)."""

    num_blocks: int
    reads_needed: bool

    def sweep(self, with_values: bool, needed: list | None = None, pass_name: str = "") -> Iterator[KeyBlock]: ...

    def backward_sweep(self, needed: list) -> "GradientSweep": ...

    def visible(self, block_m: int, block_n: int) -> list:
        """Per block, a ``BlockMask`` of the tiles that hold a visible pair, from the visibility
        rule alone (known before any score): what the max pass needs."""


class GradientSweep(Protocol):
    """Iterate for the key blocks; after each, ``hand_back(dk, dv)`` of that block; ``result()``
    gives this rank's own dk and dv, complete."""

    def __iter__(self) -> Iterator[KeyBlock]: ...

    def hand_back(self, dk: torch.Tensor, dv: torch.Tensor) -> None: ...

    def result(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class LocalReduce:
    """How partial results of one query block are combined beyond the blocks this rank visits.

    One device and the ring visit every key block locally, so nothing is left to combine. A
    strategy whose key blocks live on other ranks (queries replicated, keys sharded) overrides
    these with all-reduces; each is called the same number of times on every rank.
    """

    complete = True  # the sums over this rank's key blocks are the row's: ``sums`` is the identity

    def row_max(self, row_max: torch.Tensor) -> torch.Tensor:
        return row_max

    def sums(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class ForwardResult:
    """Everything the backward and the telemetry need, per query row (B, Hq, Sq) unless noted."""

    out: torch.Tensor | None  # (B, Sq, Hq, D) float32 output
    # (B, Sq, Hq, D) float32 (``out``'s dtype where that is final), sum u v (None: a forward with no backward)
    out_u: torch.Tensor | None
    u_sum: torch.Tensor | None  # sum u (likewise)
    # float32 (float64 for float64 inputs), in z relative to the row's score max (so in [-1, 0]);
    # +inf on rows with no visible key, NaN on rows that see a score that is not finite
    tau: torch.Tensor
    shift: torch.Tensor  # the row's score max (raw q . k), 0 where none: ``Problem.shift``
    support: torch.Tensor | None  # keys with p > 0
    block_masks: list = field(default_factory=list)  # per key block: tiles with p > 0 (``BlockMask``)
    read_masks: list = field(default_factory=list)  # per key block: tiles the output pass read
    dense_passes: int = 1
    # the forward's part of dL/dalpha's row sums where it computed one (``entmax_forward``'s
    # ``alpha_sums``, one key block), else None
    alpha_split: AlphaSplit | None = None
    # bytes of per-tile state held at once before the output pass: tile gaps, masks and tile lists
    # of every key block (``held_bytes``), the part of memory that grows with Sq x Sk; counted only
    # while ``count_tile_state`` is set (0 otherwise)
    tile_state_bytes: int = 0

    def absolute_tau(self, scale_z: float) -> torch.Tensor:
        """tau (float64) for logits ``scale_z * q . k`` without the shift, as references compute it
        (for scores far from 0 this has only the precision of the inputs' float format)."""
        return self.tau.double() + scale_z * self.shift.double()


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (a view or an expanded tensor counts its
    storage, once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


count_tile_state = False  # set by ``telemetry.record()``: only then does a forward count its tile state


def _tile_state(per_tile: dict, *mask_lists) -> int:
    """``held_bytes`` of the per-tile tensors in ``per_tile`` (tile gaps, nonzero tiles; by key block)
    and of every mask in ``mask_lists`` (lists of ``BlockMask``, with the tile lists built so far),
    or 0 outside ``count_tile_state``: a forward does no counting work unless asked."""
    if not count_tile_state:
        return 0
    return held_bytes([*per_tile.values(), *(t for masks in mask_lists for m in masks for t in m.held_tensors())])


def visible_tiles(vis: Visibility, block_m: int, block_n: int) -> BlockMask:
    """The tiles of ``vis`` that may hold a visible pair (``visibility.tile_visible``), as a
    ``BlockMask`` over one batch entry and head (the rule is shared by all)."""
    tiles = tile_visible(vis, block_m, block_n)
    return BlockMask(tiles[None, None], block_m, block_n, vis.seqlen_q, vis.seqlen_k, tiles)


def _maxima(backend: Backend, problems, blocks: KeyBlocks, reduce: LocalReduce, spec: EntmaxSpec,
            softmax_scale: float):
    """Step 1 on every block: the row's score max (global after ``reduce``) and tau floor (of the
    first block: one's own keys, the diagonal under causal), as ``stats.Relative``, and per block
    the tile gaps' codes, one byte per tile (``stats.encode_gaps``), and a ``BlockMask`` of the
    visible tiles."""
    score_max = tau_floor = None
    gap_codes = {}
    # the tiles the visibility rule lets hold a pair, shared by every batch entry and head: a tile
    # without one has the gap code GAP_NONE, which every later tile test turns down, so the
    # per-head (B, H, nQ, nK) mask of the codes, and its reduction, need not be built
    visible = blocks.visible(backend.BLOCK_M, backend.BLOCK_N)
    # tiles no query sees (outside every window, other documents) need not travel, even here
    needed = visible if blocks.reads_needed else None
    for block in blocks.sweep(with_values=False, needed=needed, pass_name="max"):
        # the running max carries over from block to block: gaps of later blocks come out tighter
        score_max, tau_floor, gap_codes[block.index] = backend.max_pass(problems(block), score_max, tau_floor)
    score_max = reduce.row_max(score_max)
    return backend.relative(score_max, tau_floor, spec, softmax_scale), gap_codes, visible


def _histogram(backend: Backend, problems, blocks: KeyBlocks, reduce: LocalReduce, row_max, tau_floor, gap_codes,
               visible):
    """Step 2: the coarse counts, added over blocks; marks the tiles that provably hold no p > 0."""
    # only these tiles can hold a key the bracket reads; histogram_pass marks the rest zero
    tiles = [visible[i].with_tiles(stats.histogram_mask(gap_codes[i])) for i in range(blocks.num_blocks)]
    hist = None
    for block in blocks.sweep(with_values=False, needed=_needed(blocks, tiles), pass_name="histogram"):
        part, gap_codes[block.index] = backend.histogram_pass(problems(block), row_max, tau_floor,
                                                              gap_codes[block.index], tiles[block.index])
        hist = part if hist is None else hist + part
    return stats.RowStats(row_max, reduce.sums(hist))


def _closed_form_tau(backend: Backend, problems, blocks, reduce, spec, bracket, reference, candidates):
    """Step 4 for alpha 1.5 and 2: one fine histogram pass and tau in closed form. Returns tau, the
    rows where it is exact (``stats.two_point_exact``), per block the tiles the pass found may
    hold p > 0 for any tau inside the pair of bins, and the tiles it read."""
    # rows whose max is their only key near tau have tau = max - 1: read only the query tiles
    # with another row
    refined = stats.per_query_tile(~bracket.single, candidates[0].block_m, "any")[..., None]
    tiles = [c.with_tiles(c.tiles & refined) for c in candidates]
    fine, keeps = None, {}
    for block in blocks.sweep(with_values=False, needed=_needed(blocks, tiles), pass_name="fine-histogram"):
        part, keeps[block.index] = backend.fine_histogram_pass(problems(block), tiles[block.index],
                                                               bracket.bin_index, reference - stats.MASK_MARGIN)
        fine = part if fine is None else fine + part
    fine = reduce.sums(fine)
    tau, exact = backend.fine_tau(bracket, fine, spec)
    kept = [keeps[i] | ~refined for i in range(blocks.num_blocks)]
    return tau, exact, kept, tiles


def _newton_steps(backend: Backend, problems, blocks, reduce, spec, tiles, state: stats.NewtonState, steps: int,
                  rows=None):
    """``steps`` safeguarded Newton steps (``stats.newton_update``, through ``backend.newton_step``:
    one launch a step) on exact sums over ``tiles`` for the rows of ``state`` not done (reading
    only the query tiles holding one of ``rows`` (B, H, Sq) bool, when given: in a ring only their
    key tiles travel). Returns the last point (float64)."""
    if rows is not None and blocks.reads_needed:
        marked = stats.per_query_tile(rows, backend.BLOCK_M, "any")[..., None]
        needed = [t.with_tiles(t.tiles & marked) for t in tiles]
    else:
        needed = _needed(blocks, tiles)
    for _ in range(steps):
        sums = None
        for block in blocks.sweep(with_values=False, needed=needed, pass_name="newton"):
            part = backend.newton_sums_pass(problems(block), tiles[block.index], state.point, rows)
            sums = part if sums is None else sums + part
        state = backend.newton_step(state, reduce.sums(sums), spec, stats.NO_STOP, stats.NO_STOP)
    return state.point


def _newton_tau(backend: Backend, problems, blocks, reduce, spec, bracket, candidates):
    """Step 4 for other alpha: safeguarded Newton steps on exact sums over the candidate tiles,
    from the counts' lower bound (float64)."""
    start = stats.NewtonState.of(bracket.estimate, bracket.estimate, bracket.upper, bracket.empty)
    point = _newton_steps(backend, problems, blocks, reduce, spec, candidates, start, stats.NEWTON_STEPS)
    return stats.finalize_tau(point, bracket.empty)


def _polished_tau(backend: Backend, problems, blocks, reduce, spec, bracket, tau, exact, tiles):
    """After the closed form: Newton steps on the rows it leaves inexact (``two_point_exact``), on
    the query tiles holding such rows only, over ``tiles`` (the fine histogram pass's, whose tile
    lists exist already); tau lies in the bracket's pair of bins. Rarely is any row left (many
    keys within 1/480 of tau, straddling it), so the steps cost about their launches: the other
    query tiles read nothing, and no mask of their own is built."""
    lower = bracket.lower.double()
    # exact rows (the empty ones among them) start done: they keep tau
    start = stats.NewtonState.of(tau, lower, lower + 2.0 / (stats.NUM_BINS - 1), exact)
    if _one_block(blocks, reduce):
        # nothing to merge between steps: all of them in one launch (``backend.newton_polish``), in
        # which the query tiles with no such row read nothing
        (block,) = blocks.sweep(with_values=False, needed=_needed(blocks, tiles), pass_name="newton")
        return backend.newton_polish(problems(block), tiles[0], start, stats.POLISH_STEPS)
    return _newton_steps(backend, problems, blocks, reduce, spec, tiles, start, stats.POLISH_STEPS, rows=~exact)


def _newton_schedule_tau(backend: Backend, problems, blocks, reduce, spec, rel: stats.Relative, gap_codes, visible,
                         dtype, output: OutputRequest | None = None):
    """tau by Newton steps alone, from the max pass's lower bound ``rel.reference``
    (``gap_reference``; ``rel.empty``: the rows with no visible key): ``stats.newton_step`` on
    exact sums over the tiles that reach above it (``newton_moments_pass``), until every row is done or
    ``stats.NEWTON_SCHEDULE_STEPS``. Each pass is a Q.K^T sweep of its tiles with two row sums
    (no bins, no atomics), and rows converge quadratically, so a handful of passes replace the
    histogram passes, whose per-key bin work costs several sweeps where many tiles are active.
    Query tiles whose rows are all done read nothing (in a ring their key tiles do not travel);
    after ``stats.NEWTON_NARROW_STEP`` steps the tiles below every row's lower bound are dropped.
    Returns tau (float64, +inf on empty rows), per block the tiles that may hold p > 0 (what the
    last pass to read each query tile found) and the ``backend.PartialOutput`` that
    ``backend.newton_schedule`` made for ``output`` with one key block, else None."""
    block_m, reference, empty = backend.BLOCK_M, rel.reference, rel.empty
    tiles = [visible[i].with_tiles(backend.lower_bound_mask(gap_codes[i], reference, reference, empty))
             for i in range(blocks.num_blocks)]
    tolerances = stats.NEWTON_TOLERANCE[dtype], stats.NEWTON_STEP_TOLERANCE[dtype]
    if _one_block(blocks, reduce):
        # every key at hand and nothing to merge: all steps in one launch (``backend.newton_schedule``)
        (block,) = blocks.sweep(with_values=output is not None, needed=_needed(blocks, tiles), pass_name="newton")
        row_max = torch.where(rel.nonfinite, float("nan"), rel.row_max)  # such rows' output is NaN
        point, keep, partial = backend.newton_schedule(problems(block), tiles[0], reference, row_max, *tolerances,
                                                       output=output)
        return stats.finalize_tau(point, empty), [tiles[0].with_tiles(tiles[0].tiles & keep)], partial
    keep = [t.tiles for t in tiles]
    state = stats.NewtonState.start(reference, rel.row_max)
    for step in range(stats.NEWTON_SCHEDULE_STEPS):
        if step == stats.NEWTON_NARROW_STEP:
            lower = torch.where(state.done, state.point, state.lower).to(reference.dtype)
            tiles = [t.with_tiles(backend.lower_bound_mask(gap_codes[i], lower, reference, empty, t.tiles))
                     for i, t in enumerate(tiles)]
        rows = ~state.done
        marked = stats.per_query_tile(rows, block_m, "any")[..., None]
        needed = [t.with_tiles(t.tiles & marked) for t in tiles] if blocks.reads_needed else None
        # which tiles may hold p > 0, from the passes whose points are close to tau: the test costs
        # about a tenth of a pass, and the early passes' points are far below
        with_keep = step >= stats.NEWTON_NARROW_STEP
        sums = None
        for block in blocks.sweep(with_values=False, needed=needed, pass_name="newton"):
            part, near = backend.newton_moments_pass(problems(block), tiles[block.index], state.point, rows, with_keep)
            sums = part if sums is None else sums + part
            if with_keep:  # query tiles read now replace what an earlier, lower point found
                keep[block.index] = torch.where(marked, near, keep[block.index])
        state = backend.newton_step(state, reduce.sums(sums), spec, *tolerances)
    kept = [t.with_tiles(t.tiles & k) for t, k in zip(tiles, keep)]
    return stats.finalize_tau(state.point, empty), kept, None


SCHEDULES = ("newton", "histogram")
SCHEDULE_ENV = "RING_ADASPLASH_SCHEDULE"  # "auto" (default), or one of SCHEDULES


def default_schedule(one_block: bool = False) -> str:
    """How tau is found, from ``RING_ADASPLASH_SCHEDULE``: ``"newton"`` (Newton steps alone,
    ``_newton_schedule_tau``) or ``"histogram"`` (counts, then a fine histogram or Newton steps from
    the bracket), whatever alpha. ``"auto"`` (default) is Newton where a query block holds all its
    keys and nothing is merged (``one_block``: one device, Ulysses), where the whole schedule runs
    in one launch; the histogram elsewhere (a ring, keys sharded), where each Newton step is a pass
    and a step launch per key block (why: docs/design.md, section 2, item 5')."""
    choice = os.environ.get(SCHEDULE_ENV, "auto")
    if choice not in ("auto",) + SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV} must be one of auto, {', '.join(SCHEDULES)}; got {choice!r}")
    newton = choice == "newton" or (choice == "auto" and one_block)
    return "newton" if newton else "histogram"


def _one_block(blocks: KeyBlocks, reduce: LocalReduce) -> bool:
    """All of a query block's keys in one block and nothing to merge (one device, Ulysses): steps
    that would merge sums between them can run in one launch."""
    return blocks.num_blocks == 1 and reduce.complete


def _needed(blocks: KeyBlocks, masks: list):
    return masks if blocks.reads_needed else None


def entmax_forward(backend: Backend, q: torch.Tensor, blocks: KeyBlocks, spec: EntmaxSpec, softmax_scale: float,
                   reduce: LocalReduce = LocalReduce(), schedule: str | None = None,
                   backward_sums: bool = True, out_dtype: torch.dtype | None = None,
                   alpha_sums: bool = False) -> ForwardResult:
    """Exact alpha-entmax attention of ``q`` (B, Sq, Hq, D) against all key blocks; ``schedule``:
    one of ``SCHEDULES``, default ``default_schedule`` (``one_block``: one key block, nothing to merge).
    ``backward_sums``: also the row terms the backward needs (``out_u``, ``u_sum``); without
    them (no backward to come) the output pass does a product with V fewer per tile.
    ``out_dtype``: the dtype of ``out`` where the caller takes it as final (one key block and
    nothing to merge: the kernel then stores it once, with no float32 copy; else float32), and
    of ``out_u`` then: the backward reads it once, for the row term delta, which it sums in
    float32 (as flash attention takes delta from the 16-bit output). ``alpha_sums``: where the
    backend can (one key block), also the forward's part of the alpha gradient
    (``ForwardResult.alpha_split``) for a backward that asks for it."""
    if out_dtype is not None and not _one_block(blocks, reduce):
        raise ValueError(f"out_dtype needs one key block and nothing to merge; got {blocks.num_blocks} blocks")
    schedule = schedule or default_schedule(_one_block(blocks, reduce))
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")

    def raw_problems(block: KeyBlock):
        return backend.problem(q, block.k, block.v, block.vis, spec, softmax_scale)

    rel, gap_codes, visible = _maxima(backend, raw_problems, blocks, reduce, spec, softmax_scale)

    def problems(block: KeyBlock):
        return backend.problem(q, block.k, block.v, block.vis, spec, softmax_scale, rel.shift)

    reference = rel.reference
    if schedule == "newton":
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        output = OutputRequest(backward_sums, out_dtype, alpha_sums) if _one_block(blocks, reduce) else None
        tau, read, partial = _newton_schedule_tau(backend, problems, blocks, reduce, spec, rel, gap_codes, visible,
                                                  dtype, output)
        tau = tau.to(reference.dtype)  # what the masks and the output pass read: one cast
        candidates = [r.with_tiles(backend.lower_bound_mask(gap_codes[i], tau, reference, rel.empty, r.tiles))
                      for i, r in enumerate(read)]
        held = _tile_state(gap_codes, visible, read, candidates)
        del gap_codes, read  # freed before the output pass: the candidates are all it needs
        return _output(backend, problems, blocks, reduce, rel, tau, candidates, visible, q.dtype, held, backward_sums,
                       out_dtype, partial)
    row_stats = _histogram(backend, problems, blocks, reduce, rel.row_max, rel.tau_floor, gap_codes, visible)
    bracket = backend.coarse_bracket(row_stats, spec)
    candidates = [visible[i].with_tiles(backend.lower_bound_mask(gap_codes[i], bracket.lower, reference, bracket.empty))
                  for i in range(blocks.num_blocks)]
    if spec.closed_form:
        tau, exact, kept, read = _closed_form_tau(backend, problems, blocks, reduce, spec, bracket, reference,
                                                  candidates)
        tau = _polished_tau(backend, problems, blocks, reduce, spec, bracket, tau, exact, read)
        # block mask from the exact tau: a key with p > 0 has z > tau
        candidates = [visible[i].with_tiles(backend.lower_bound_mask(gap_codes[i], tau, reference, bracket.empty,
                                                                     kept[i])) for i in range(blocks.num_blocks)]
    else:
        tau = _newton_tau(backend, problems, blocks, reduce, spec, bracket, candidates)
    held = _tile_state(gap_codes, visible, candidates)
    del gap_codes  # the bool masks are all the output pass needs
    return _output(backend, problems, blocks, reduce, rel, tau, candidates, visible, q.dtype, held, backward_sums,
                   out_dtype)


def _output(backend: Backend, problems, blocks, reduce, rel, tau, candidates, visible, dtype,
            tile_state_bytes: int, backward_sums: bool, out_dtype: torch.dtype | None = None,
            partial: PartialOutput | None = None) -> ForwardResult:
    """Step 5 for a known tau (NaN on rows that see a score that is not finite), over the
    ``candidates`` tiles; ``out_u`` and ``u_sum`` only with ``backward_sums``; with ``partial``
    (one key block: what ``backend.newton_schedule`` computed), only its open query tiles. The
    tile state counted is the larger of ``tile_state_bytes`` (before) and what the pass holds:
    the visible and candidate masks with the tile lists it builds, and the nonzero tiles it finds."""
    tau = torch.where(rel.nonfinite, float("nan"), tau).to(torch.float64 if dtype == torch.float64 else torch.float32)
    parts, nonzero = None, {}
    for block in blocks.sweep(with_values=True, needed=_needed(blocks, candidates), pass_name="output"):
        *sums, nonzero[block.index] = backend.output_pass(problems(block), tau, candidates[block.index],
                                                          backward_sums, out_dtype, partial=partial)
        parts = sums if parts is None else [None if a is None else a + b for a, b in zip(parts, sums)]
    out, out_u, u_sum, support = (None if p is None else reduce.sums(p) for p in parts)
    tile_state_bytes = max(tile_state_bytes, _tile_state(nonzero, visible, candidates))
    masks = [visible[i].with_tiles(nonzero[i]) for i in range(blocks.num_blocks)]
    return ForwardResult(out, out_u, u_sum, tau, rel.shift, support, masks, candidates,
                         tile_state_bytes=tile_state_bytes, alpha_split=None if partial is None else partial.alpha)


def entmax_forward_in_query_chunks(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   vis: Visibility, spec: EntmaxSpec, softmax_scale: float, chunk_rows: int,
                                   backward_sums: bool = True, out_dtype: torch.dtype | None = None,
                                   alpha_sums: bool = False) -> ForwardResult:
    """``entmax_forward`` of ``q`` (B, Sq, Hq, D) against all its keys (one key block, one device),
    ``chunk_rows`` queries at a time (a multiple of ``backend.BLOCK_M``): a row's tau and output
    depend on its own scores only, so each chunk is a forward of its own, the same to the bit.
    What grows with Sq x Sk in a forward (the tile gaps, masks and lists it holds until the
    output pass) then grows with ``chunk_rows`` x Sk; the results, and the nonzero tiles the
    backward reads (as bits: ``BlockMask.from_bits``), are written into tensors of the whole call
    as each chunk ends. ``read_masks`` is left empty (no chunk's is kept)."""
    if chunk_rows <= 0 or chunk_rows % backend.BLOCK_M:
        raise ValueError(f"chunk_rows must be a positive multiple of {backend.BLOCK_M}; got {chunk_rows}")
    seqlen_q = q.shape[1]
    whole = None
    for start in range(0, seqlen_q, chunk_rows):
        stop = min(start + chunk_rows, seqlen_q)
        part = entmax_forward(backend, q[:, start:stop], SingleBlock(k, v, vis.queries(start, stop)), spec,
                              softmax_scale, backward_sums=backward_sums, out_dtype=out_dtype, alpha_sums=alpha_sums)
        if whole is None:
            whole = _whole_call_like(part, seqlen_q, vis.seqlen_k, backend)
        rows, tiles = slice(start, stop), slice(start // backend.BLOCK_M, -(-stop // backend.BLOCK_M))
        for name in ("out", "out_u"):
            if getattr(part, name) is not None:
                getattr(whole, name)[:, rows] = getattr(part, name)
        for name in ("u_sum", "tau", "shift", "support"):
            if getattr(part, name) is not None:
                getattr(whole, name)[..., rows] = getattr(part, name)
        if part.alpha_split is not None:
            whole.alpha_split.out_c[:, rows] = part.alpha_split.out_c
            whole.alpha_split.c_sum[..., rows] = part.alpha_split.c_sum
            whole.alpha_split.open[..., tiles] = part.alpha_split.open
        whole.block_masks[0].bits[:, :, tiles] = part.block_masks[0].bits
        whole.block_masks[0].visible[tiles] = part.block_masks[0].visible
        whole.tile_state_bytes = max(whole.tile_state_bytes, part.tile_state_bytes)
        del part  # its tile state is freed before the next chunk's
    return whole


def _whole_call_like(part: ForwardResult, seqlen_q: int, seqlen_k: int, backend: Backend) -> ForwardResult:
    """An empty ``ForwardResult`` of ``seqlen_q`` queries shaped as the chunk ``part``'s (its block
    mask's tiles, as bits, zero, to be filled chunk by chunk, as its visible tiles)."""
    def rows_like(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        if x is None:
            return None
        shape = list(x.shape)
        shape[dim] = seqlen_q
        return x.new_empty(shape)

    batch, heads, _, num_k_tiles = part.block_masks[0].grid
    num_q_tiles = -(-seqlen_q // backend.BLOCK_M)
    device = part.block_masks[0].visible.device
    bits = torch.zeros((batch, heads, num_q_tiles, packed_width(num_k_tiles)), dtype=torch.uint8, device=device)
    visible = torch.zeros((num_q_tiles, num_k_tiles), dtype=torch.bool, device=device)
    mask = BlockMask.from_bits(bits, num_k_tiles, backend.BLOCK_M, backend.BLOCK_N, seqlen_q, seqlen_k, visible)
    split = part.alpha_split
    if split is not None:
        open_tiles = split.open.new_empty((*split.open.shape[:-1], num_q_tiles))
        split = AlphaSplit(rows_like(split.out_c, 1), rows_like(split.c_sum, -1), open_tiles)
    return ForwardResult(rows_like(part.out, 1), rows_like(part.out_u, 1), rows_like(part.u_sum, -1),
                         rows_like(part.tau, -1), rows_like(part.shift, -1), rows_like(part.support, -1),
                         block_masks=[mask], read_masks=[], dense_passes=part.dense_passes, alpha_split=split)


def entmax_backward(backend: Backend, q, grad_out, blocks: KeyBlocks, fwd: ForwardResult, spec: EntmaxSpec,
                    softmax_scale: float, reduce: LocalReduce = LocalReduce(),
                    kv_grad_dtype: torch.dtype | None = None, alpha_grad: bool = False,
                    q_grad_dtype: torch.dtype | None = None):
    """Returns dq (B, Sq, Hq, D) and the local block's dk, dv, in the compute dtype (fp32/fp64),
    and with ``alpha_grad`` dL/dalpha per row (B, Hq, Sq) (``EntmaxSpec.alpha_gradient``), else
    None; ``kv_grad_dtype``, ``q_grad_dtype``: the dtype of dk and dv, and of dq, where the caller
    takes them as final (one key block: the kernels then store them once, with no float32 copy and
    no cast after; at a million tokens a float32 dq is 8 GiB)."""
    if (kv_grad_dtype is not None or q_grad_dtype is not None) and blocks.num_blocks != 1:
        raise ValueError(f"kv_grad_dtype and q_grad_dtype need one key block, whose gradients are final; got "
                         f"{blocks.num_blocks}")
    alpha_sums = None
    dq, delta = None, None  # the row term, computed with the first block's dq (one launch fewer)
    sweep = blocks.backward_sweep(_needed(blocks, fwd.block_masks))
    for block in sweep:
        problem = backend.problem(q, block.k, block.v, block.vis, spec, softmax_scale, fwd.shift)
        # the forward's part of the alpha sums is the row's only where one block holds every key
        split = fwd.alpha_split if alpha_grad and blocks.num_blocks == 1 else None
        grads = backend.backward_pass(problem, grad_out, fwd.tau, fwd.block_masks[block.index], delta, fwd.out_u,
                                      fwd.u_sum, kv_grad_dtype, alpha_grad, q_grad_dtype, split)
        dq = grads.dq if dq is None else dq + grads.dq
        if alpha_grad:
            alpha_sums = grads.alpha_sums if alpha_sums is None else alpha_sums + grads.alpha_sums
        delta = grads.delta
        sweep.hand_back(grads.dk, grads.dv)
    dk, dv = sweep.result()
    d_alpha = spec.alpha_gradient(reduce.sums(alpha_sums)) if alpha_grad else None
    return reduce.sums(dq), dk, dv, d_alpha


class SingleBlock:
    """All keys in one block: the one-device case (and a rank's own block when keys are sharded
    and the partial results all-reduced)."""

    num_blocks = 1
    reads_needed = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor, vis: Visibility):
        self.k, self.v, self.vis = k, v, vis
        self._grads = None

    def sweep(self, with_values: bool, needed=None, pass_name: str = "") -> Iterator[KeyBlock]:
        yield KeyBlock(0, self.k, self.v if with_values else None, self.vis)

    def backward_sweep(self, needed) -> "SingleBlock":
        return self

    def visible(self, block_m: int, block_n: int) -> list:
        return [visible_tiles(self.vis, block_m, block_n)]

    def __iter__(self) -> Iterator[KeyBlock]:
        yield KeyBlock(0, self.k, self.v, self.vis)

    def hand_back(self, dk: torch.Tensor, dv: torch.Tensor) -> None:
        self._grads = (dk, dv)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        grads, self._grads = self._grads, None
        return grads
