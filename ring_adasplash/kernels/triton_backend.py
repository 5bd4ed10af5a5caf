"""Triton backend: ``backend.Backend`` with Triton kernels, with the contract of ``torch_blockwise``.

Inputs come in the public layout (B, S, H, D) with any strides (passed per axis, never copied);
per-row results are head-major (B, H, Sq, ...) and contiguous. GQA: query head ``h`` reads key
head ``h // (Hq // Hkv)``. The kernels live in ``triton_maxima`` (the max pass),
``triton_histogram``, ``triton_refine`` (fine histogram, Newton sums), ``triton_output``,
``triton_backward`` and ``triton_tau`` (tau from the statistics, in place of the float64 PyTorch
math of ``stats`` for alpha 1.5 and 2, and the Newton schedule's step), ``triton_newton`` (the
whole Newton schedule in one launch, for one key block), ``triton_candidates`` (the same schedule
on each row's candidate keys, before it), their shared helpers in
``triton_common``; ``triton_entmax`` is entmax over the rows of any tensor (``entmax_rows``).
``TritonProblem`` derives once per key block what every launch reads (visibility vectors, per
query tile the range of key tiles with visible pairs, strides, constants); each pass below is
one launch or two, with its arguments by name. Launch configurations are a fixed table: nothing
is autotuned, so a first call compiles each kernel once.

CPU tensors run the same kernels under Triton's interpreter (``TRITON_INTERPRET=1``, read when the
kernel modules are imported); see ``triton_common`` for how products are computed there
(``PRECISION``). float64 inputs never come here (``backend.backend_for``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch
import triton

from . import stats as S
from . import (entmax_spec, triton_backward, triton_candidates, triton_entmax, triton_histogram, triton_maxima,
               triton_newton, triton_output, triton_refine, triton_tau, triton_tiles)
from .backend import (CANDIDATES_ENV, AlphaSplit, Gradients, Maxima, OutputRequest, OutputSums, PartialOutput,
                      Problem)
from .block_mask import BlockMask
from .compile_ahead import launch
from .entmax_spec import POWER_GENERAL, POWER_GENERAL_EXACT_LOG, EntmaxSpec
from .identity import remembered_in, tensor_identity
from .visibility import Visibility, first_true, tile_visible, true_span

NAME = "triton"
BLOCK_M = 64  # query rows per tile, in every kernel and in the block mask
BLOCK_N = 64  # keys per tile
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# rows and warps per program of the tau kernels (why: docs/design.md (kernel choices))
TAU_ROWS = 32
TAU_WARPS = 4
FINE_TAU_ROWS = 16
FINE_TAU_WARPS = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _runs_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(problem: Problem) -> None:
    if not _runs_kernels(problem.q):
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (set before the kernel "
                           "modules are imported) to run on CPU tensors; or use RING_ADASPLASH_BACKEND=torch")
    if problem.q.dtype == torch.float64:
        raise ValueError("no Triton kernel computes in float64: backend.backend_for sends float64 to torch_blockwise")
    if (problem.block_m, problem.block_n) != (BLOCK_M, BLOCK_N):
        raise ValueError(f"the Triton kernels use {BLOCK_M}x{BLOCK_N} tiles; got {problem.block_m}x{problem.block_n}")
    if problem.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {problem.head_dim} is not supported by the Triton kernels; expected one of "
                         f"{SUPPORTED_HEAD_DIMS}")
    if problem.heads % problem.heads_kv:
        raise ValueError(f"heads of q ({problem.heads}) must be a multiple of heads of k ({problem.heads_kv})")


# The kernels compute element offsets within one batch element of a (B, S, H, D) tensor in int32
# below this, in int64 from it (``triton_common.offset_strides``).
INT32_OFFSETS = 2**31


def _offset_reach(x: torch.Tensor) -> int:
    """An upper bound of the element offsets the kernels form within one batch element of ``x``
    (B, S, H, D), in its own layout or contiguous (its gradient's), the rows of a tile past the
    last position included (their addresses are formed under a mask, never read)."""
    _, seqlen, heads, dim = x.shape
    contiguous = heads * dim
    return max((seqlen + max(BLOCK_M, BLOCK_N)) * x.stride(1) + heads * x.stride(2) + dim * x.stride(3),
               (seqlen + max(BLOCK_M, BLOCK_N) + 1) * contiguous)


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether the kernels need int64 offsets (``WIDE_OFFSETS``) for any of ``tensors`` (B, S, H, D)."""
    return any(_offset_reach(x) >= INT32_OFFSETS for x in tensors)


def _precision(q: torch.Tensor) -> str:
    """``triton_common.dot``'s ``PRECISION`` for inputs like ``q``."""
    if q.dtype == torch.float32:
        return "ieee"
    return "native" if q.is_cuda else "f32"


def _strides(name: str, x: torch.Tensor) -> dict:
    """The strides of ``x`` (B, S, H, D) per axis, named as the kernels take them: stride_{name}b, ...;
    raises where the offsets along the head dim overflow int32 (the kernels widen the position
    and head strides only, ``triton_common.offset_strides``)."""
    if x.shape[3] * x.stride(3) >= 2**31:
        raise ValueError(f"{name}: its head_dim stride ({x.stride(3)}) puts a row's elements 2^31 or more apart; "
                         f"expected a layout (batch, seqlen, heads, head_dim) with a small head_dim stride")
    return {f"stride_{name}{axis}": stride for axis, stride in zip("bshd", x.stride())}


def _sparse(d: int) -> dict:
    return {"num_warps": 8 if d >= 256 else 4, "num_stages": 2 if d >= 256 else 3}


def _backward(d: int) -> dict:
    # 4 warps up to D 128: two programs an SM at 255 registers, where 8 warps fit one
    return {"num_warps": 8 if d > 128 else 4, "num_stages": 1 if d >= 256 else 2}


def _dkdv_settings(d: int) -> dict:
    # a third stage of loads pays at D 64; at D 128 the kernel was slower with it (docs/design.md, kernel choices)
    return _backward(d) | ({"num_stages": 3} if d <= 64 else {}) | {"Q_STEP": DKDV_Q_STEP.get(d, BLOCK_M)}


# Launch settings per kernel, by head dim: a fixed table, each entry measured (why: docs/design.md
# (kernel choices); no autotuning). ``UNROLL``: key tiles per trip of the loop over the tiles with
# every pair visible (``triton_common.list_slots``; one tile over the others), for the kernels
# that take it; one above head dim 128, where two trips' tiles exceed an sm_90 block's shared
# memory, and for float32 inputs (``TritonProblem.config``)
_CONFIGS = {
    "max": lambda d: {"num_warps": 8 if d >= 256 else 4, "num_stages": 2},
    "sparse": _sparse,  # the histogram schedule's passes
    "newton_sums": lambda d: _sparse(d) | {"UNROLL": 2 if d <= 128 else 1},
    "newton": lambda d: _sparse(d) | {"UNROLL": 2 if d <= 64 else 1},
    "candidates": lambda d: _sparse(d) | {"UNROLL": 1},
    "output": lambda d: {"num_warps": 8 if d >= 256 else 4, "num_stages": 2, "UNROLL": 2 if d <= 64 else 1},
    "dq": _backward,
    "dkdv": _dkdv_settings,
}
# query rows per step of the dK/dV kernel's loop over a query tile, by head dim (BLOCK_M where
# absent): at D 128 a step's (keys, rows) float32 tiles beside the two (keys, D) accumulators spill
# at 64 rows (docs/design.md, kernel choices)
DKDV_Q_STEP = {128: 32}
# Registers per thread (``maxnreg``) by kernel and head dim, for 16-bit inputs: capped where the
# programs that then fit on an SM more than pay for the spills
_MAX_REGISTERS = {"newton": {64: 128, 128: 168}, "candidates": {64: 128}, "output": {64: 168},
                  "dq": {64: 128}}


@dataclass(frozen=True, eq=False)
class TritonProblem(Problem):
    """A ``Problem`` checked once, with what every launch reads, derived once (per key block)."""

    def __post_init__(self):
        super().__post_init__()
        _check(self)

    @cached_property
    def visibility(self) -> dict:
        """The six visibility vectors as int32 device tensors, by kernel parameter name."""
        names = ("Q_limit", "Q_doc", "K_pos", "K_doc", "Q_first", "K_win_pos")
        vectors = dict(zip(names, self.vis.vectors()))
        return {name: t.to(device=self.q.device, dtype=torch.int32).contiguous() for name, t in vectors.items()}

    @cached_property
    def ranges(self) -> dict:
        """Per query tile, key tiles [K_tile_lo, K_tile_hi) with visible pairs and [K_full_lo,
        K_full_hi) with only visible pairs (``_key_tile_ranges``): the max pass's arguments."""
        names = ("K_tile_lo", "K_tile_hi", "K_full_lo", "K_full_hi")
        return dict(zip(names, _key_tile_ranges(self.vis, self.q.device)))

    @cached_property
    def query_ranges(self) -> dict:
        """Per key tile, query tiles [Q_full_lo, Q_full_hi) with only visible pairs
        (``_key_tile_ranges``): the dK/dV kernel's arguments."""
        return dict(zip(("Q_full_lo", "Q_full_hi"), _key_tile_ranges(self.vis, self.q.device)[4:6]))

    @cached_property
    def query_spans(self) -> tuple:
        """Per key tile, query tiles [first, end) outside of which none has a visible pair
        (``_key_tile_ranges``): where the backward's column lists read (``BlockMask.query_tile_lists``)."""
        return tuple(_key_tile_ranges(self.vis, self.q.device)[6:])

    @cached_property
    def queries(self) -> dict:
        """The arguments every kernel with one program per query tile (and the dK/dV kernel) takes."""
        return dict(Q=self.q, K=self.k, **self.visibility, **_strides("q", self.q), **_strides("k", self.k),
                    seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, num_heads=self.heads,
                    scale_z=self.constants["scale_z"], PER_HEAD=self.constants["PER_HEAD"], GROUP=self.group,
                    HEAD_DIM=self.head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=_precision(self.q))

    @cached_property
    def constants(self) -> dict:
        """``scale_z`` and ``gamma``, one value or one per query head (``EntmaxSpec.kernel_constants``)."""
        return self.spec.kernel_constants(self.softmax_scale, self.q.device)

    @cached_property
    def weights(self) -> dict:
        """How the kernels raise ``(z - tau)_+`` to p and u (``EntmaxSpec.power``, ``gamma``)."""
        return {"gamma": self.constants["gamma"], "POWER": self.spec.power}

    @cached_property
    def shift_rows(self) -> torch.Tensor:
        """``Problem.shift`` as the kernels read it (``Shift``): per row, float32; zeros if None."""
        if self.shift is None:
            return torch.zeros(self.rows, device=self.q.device, dtype=torch.float32)
        return self.per_row(self.shift)

    def listed(self, tiles: BlockMask) -> dict:
        """``queries``, the shift and, per query tile, the key tiles of ``tiles`` (lists built once
        per mask) and its run of fully visible ones: the arguments of the sparse passes."""
        counts, index = tiles.key_tile_lists()
        return dict(self.queries, K_full_lo=self.ranges["K_full_lo"], K_full_hi=self.ranges["K_full_hi"],
                    Tile_count=counts, Tile_index=index, num_k_tiles=self.num_k_tiles, list_width=index.shape[-1],
                    Shift=self.shift_rows)

    @property
    def query_grid(self) -> tuple[int, int]:
        """One program per (query tile, batch x query head)."""
        return (self.num_q_tiles, self.batch * self.heads)

    @cached_property
    def wide_offsets(self) -> bool:
        """``wide_offsets`` of q, k and, where the problem has them, v and the output (B, Sq, H, Dv)."""
        if self.v is None:
            return wide_offsets(self.q, self.k)
        out = torch.empty(self.batch, self.seqlen_q, self.heads, self.v.shape[-1], device="meta")
        return wide_offsets(self.q, self.k, self.v, out)

    def config(self, kind: str, *inputs: torch.Tensor) -> dict:
        """Launch settings of a kernel of ``kind`` (a key of ``_CONFIGS``) for this problem, whose
        other (B, S, H, D) ``inputs`` (the backward's grad_out) also decide ``WIDE_OFFSETS``."""
        settings = _CONFIGS[kind](self.head_dim) | {"WIDE_OFFSETS": self.wide_offsets or wide_offsets(*inputs)}
        if self.q.dtype == torch.float32:
            # float32 products are multiply-adds, not tensor-core instructions: two tiles per trip
            # multiplied the compile time of the output kernel, for no speed float32 is used for
            if "UNROLL" in settings:
                settings["UNROLL"] = 1
        elif self.head_dim in _MAX_REGISTERS.get(kind, {}):
            settings["maxnreg"] = _MAX_REGISTERS[kind][self.head_dim]
        return settings

    def per_row(self, x: torch.Tensor) -> torch.Tensor:
        """A per-row input (B, H, Sq) as the kernels read it: float32, contiguous, on the device."""
        return x.to(device=self.q.device, dtype=torch.float32).contiguous()

    def empty_rows(self, *tail: int) -> torch.Tensor:
        """A float32 per-row output (B, H, Sq, *tail) that the kernels fill."""
        return torch.empty(*self.rows, *tail, device=self.q.device, dtype=torch.float32)


def problem(q, k, v, vis: Visibility, spec: EntmaxSpec, softmax_scale: float, shift=None) -> TritonProblem:
    return TritonProblem(q, k, v, vis, spec, softmax_scale, BLOCK_M, BLOCK_N, shift)


_RANGES_CACHE: dict = {}  # where the four visibility vectors live, and their versions -> (vectors, ranges)
RANGES_CACHE_SIZE = 16


def _key_tile_ranges(vis: Visibility, device):
    """``_compute_key_tile_ranges``, remembered for the last few visibility rules: some forty small
    ops that would otherwise run on every call. The key is each vector's memory, layout and
    version counter; the entry holds the vectors, so that memory cannot be handed to other
    tensors while it lives, and an in-place change misses."""
    tensors = vis.vectors()
    key = (str(device),) + tuple(tensor_identity(t) for t in tensors)
    return remembered_in(_RANGES_CACHE, key, RANGES_CACHE_SIZE,
                         lambda: (tensors, _compute_key_tile_ranges(vis, device)))[1]


def remembered() -> list:
    """Every tensor the launchers keep between calls (``_key_tile_ranges``, the per-head constants
    of ``entmax_spec``). A captured CUDA graph reads them by address, so it holds this list: an
    entry dropped from a cache stays alive."""
    return list(_RANGES_CACHE.values()) + entmax_spec.remembered()


def _compute_key_tile_ranges(vis: Visibility, device):
    """Per query tile (int32, (nQ,) each): key tiles [lo, hi) spanning every tile that may hold a
    visible pair (``visibility.tile_visible``; tiles in between with none come out -inf), and a run
    [full_lo, full_hi) of tiles whose every pair is visible (no per-element mask needed); per key
    tile (int32, (nK,) each), the run [q_full_lo, q_full_hi) of query tiles that see it whole, and
    [q_span_lo, q_span_hi) spanning every query tile that may see it (empty where none does)."""
    visible = tile_visible(vis, BLOCK_M, BLOCK_N)
    lo, hi = (t.to(device) for t in true_span(visible))
    q_span_lo, q_span_hi = (t.to(device) for t in true_span(visible.T))

    def tiles(x, block, fill):
        pad = (-x.shape[0]) % block
        return torch.nn.functional.pad(x.to(device=device, dtype=torch.int64), (0, pad), value=fill).view(-1, block)

    big = 2**40
    q_limit, q_doc = tiles(vis.q_limit, BLOCK_M, -big), tiles(vis.q_doc, BLOCK_M, -big)
    k_pos, k_doc = tiles(vis.k_pos, BLOCK_N, big), tiles(vis.k_doc, BLOCK_N, big)
    q_first, k_win_pos = tiles(vis.q_first, BLOCK_M, big), tiles(vis.k_win_pos, BLOCK_N, -big)
    one_q_doc = q_doc.amin(1) == q_doc.amax(1)
    one_k_doc = k_doc.amin(1) == k_doc.amax(1)
    full = ((k_pos.amax(1)[None, :] <= q_limit.amin(1)[:, None])
            & (k_win_pos.amin(1)[None, :] >= q_first.amax(1)[:, None])
            & one_q_doc[:, None] & one_k_doc[None, :]
            & (q_doc.amin(1)[:, None] == k_doc.amin(1)[None, :]))
    full_lo, full_hi = first_run(full)
    q_full_lo, q_full_hi = first_run(full.T)
    spans = (lo, hi, full_lo, full_hi, q_full_lo, q_full_hi, q_span_lo, q_span_hi)
    return [t.to(torch.int32).contiguous() for t in spans]


def first_run(mask: torch.Tensor):
    """Per row of ``mask`` (rows, n), the first run [lo, hi) of True (lo == hi == n where none)."""
    n = mask.shape[1]
    lo = first_true(mask, n)
    pos = torch.arange(n, device=mask.device)
    return lo, first_true(~mask & (pos[None, :] >= lo[:, None]), n)


def _tau_floor(problem: TritonProblem) -> torch.Tensor:
    """``Maxima.tau_floor`` of this key block (``triton_maxima.tau_floor_kernel``)."""
    floor = problem.empty_rows()
    launch(triton_maxima.tau_floor_kernel, problem.query_grid)(
        **problem.queries, K_tile_lo=problem.ranges["K_tile_lo"], K_tile_hi=problem.ranges["K_tile_hi"],
        Tau_floor=floor, **problem.weights, STEPS=S.FLOOR_STEPS, MARGIN=S.FLOOR_MARGIN, **problem.config("max"))
    return floor


RELATIVE_BLOCK = 1024  # rows per program of ``triton_maxima.relative_kernel``
ENCODE_BLOCK = 4096  # tiles per program of ``triton_maxima.encode_gaps_kernel``


def relative(score_max, tau_floor, spec: EntmaxSpec, softmax_scale: float) -> S.Relative:
    """``stats.relative`` (float32) in one launch (``triton_maxima.relative_kernel``), where
    PyTorch takes some fifteen."""
    score_max, tau_floor = (x.to(torch.float32).contiguous() for x in (score_max, tau_floor))
    shift, row_max, floor, reference = (torch.empty_like(score_max) for _ in range(4))
    nonfinite, empty = (torch.empty(score_max.shape, device=score_max.device, dtype=torch.bool) for _ in range(2))
    constants = spec.kernel_constants(softmax_scale, score_max.device)
    if score_max.numel():
        launch(triton_maxima.relative_kernel, (triton.cdiv(score_max.numel(), RELATIVE_BLOCK),))(
            Score_max=score_max, Tau_floor=tau_floor, Shift=shift, Row_max=row_max, Floor=floor, Reference=reference,
            Nonfinite=nonfinite.view(torch.int8), Empty=empty.view(torch.int8), scale_z=constants["scale_z"],
            num_rows=score_max.numel(), seqlen_q=score_max.shape[-1], num_heads=score_max.shape[1],
            PER_HEAD=constants["PER_HEAD"], BLOCK=RELATIVE_BLOCK, num_warps=4)
    return S.Relative(shift, row_max, floor, nonfinite, reference, empty)


def lower_bound_mask(gap_codes, lower, reference, empty, within=None) -> torch.Tensor:
    """``stats.lower_bound_mask`` in one launch (``triton_tiles.lower_bound_mask``)."""
    return triton_tiles.lower_bound_mask(gap_codes, lower, reference, empty, BLOCK_M, within)


def max_pass(problem: TritonProblem, score_max=None, tau_floor=None) -> Maxima:
    """Score max, tau floor (``tau_floor_kernel``, unless given) and tile gaps (the dense sweep,
    ``max_kernel``); see ``torch_blockwise.max_pass``."""
    floor = _tau_floor(problem) if tau_floor is None else problem.per_row(tau_floor)
    if score_max is None:
        running = problem.empty_rows()
    else:
        running = score_max.to(device=problem.q.device, dtype=torch.float32, copy=True).contiguous()
    tile_gap = torch.full(problem.tiles, float("-inf"), device=problem.q.device)
    launch(triton_maxima.max_kernel, problem.query_grid)(
        **problem.queries, **problem.ranges, Row_max=running, Tau_floor=floor, Tile_gap=tile_gap,
        num_k_tiles=problem.num_k_tiles, HAS_ROW_MAX=score_max is not None, **problem.config("max"))
    # one byte per tile from here on (the float gaps of one block at a time)
    gap_codes = torch.empty(problem.tiles, device=problem.q.device, dtype=torch.uint8)
    if tile_gap.numel():
        launch(triton_maxima.encode_gaps_kernel, (triton.cdiv(tile_gap.numel(), ENCODE_BLOCK),))(
            Tile_gap=tile_gap, Gap_codes=gap_codes, num_tiles=tile_gap.numel(), GAP_LOW=S.GAP_LOW,
            GAP_STEP=S.GAP_STEP, EDGE_SLACK=0.1 * S.GAP_ROUNDING, BLOCK=ENCODE_BLOCK, num_warps=4)
    return Maxima(running, floor, gap_codes)


def histogram_pass(problem: TritonProblem, row_max, tau_floor, gap_codes, tiles: BlockMask):
    """Coarse counts over ``tiles`` (``triton_histogram.histogram_kernel``), which also marks the
    tiles where some row has a key in its own kept bins; every other visible tile gets
    ``GAP_ZERO`` (``gap_codes``, ``stats.encode_gaps``, updated in place). ``tau_floor`` None: every
    bin kept. See ``torch_blockwise.histogram_pass``."""
    hist = problem.empty_rows(S.NUM_BINS)
    near = torch.zeros(gap_codes.shape, device=problem.q.device, dtype=torch.int8)
    floor = torch.full(problem.rows, float("-inf"), device=problem.q.device) if tau_floor is None else tau_floor
    launch(triton_histogram.histogram_kernel, problem.query_grid)(
        **problem.listed(tiles), Row_max=problem.per_row(row_max), Tau_floor=problem.per_row(floor), Hist=hist,
        Keep=near, floor_margin=S.HISTOGRAM_MARGIN, NUM_BINS=S.NUM_BINS, **problem.config("sparse"))
    return hist, gap_codes.masked_fill_((near == 0) & (gap_codes != S.GAP_NONE), S.GAP_ZERO)


def fine_histogram_pass(problem: TritonProblem, tiles: BlockMask, bin_index, cutoff=None):
    """Fine histogram of the pair of bins from ``bin_index``, the moments above it and the kept
    tiles (``triton_refine.fine_histogram_kernel``); see ``torch_blockwise.fine_histogram_pass``."""
    sums = problem.empty_rows(3, S.FINE_BINS + 1)  # every program zeroes its rows first
    keep = torch.zeros(tiles.tiles.shape, device=problem.q.device, dtype=torch.int8)
    cutoff = torch.full(problem.rows, float("-inf"), device=problem.q.device) if cutoff is None else cutoff
    launch(triton_refine.fine_histogram_kernel, problem.query_grid)(
        **problem.listed(tiles), Bin_index=problem.per_row(bin_index), Cutoff=problem.per_row(cutoff), Sums=sums,
        Keep=keep, NUM_BINS=S.NUM_BINS, FINE_BINS=S.FINE_BINS,
        ROW_BLOCK=triton.next_power_of_2(3 * (S.FINE_BINS + 1)), **problem.config("sparse"))
    return sums, keep.view(torch.bool)


def _newton_sums(problem: TritonProblem, tiles: BlockMask, point, rows, count: bool, keep: bool):
    sums = problem.empty_rows(3 if count else 2)
    kept = torch.zeros(problem.tiles if keep else (1,), device=problem.q.device, dtype=torch.int8)
    marked = point if rows is None else rows.to(device=problem.q.device, dtype=torch.int8).contiguous()
    launch(triton_refine.newton_sums_kernel, problem.query_grid)(
        **problem.listed(tiles), Point=problem.per_row(point), Rows=marked, Sums=sums, Keep=kept,
        keep_margin=S.MASK_MARGIN, **problem.weights, SOME_ROWS=rows is not None, COUNT=count, KEEP=keep,
        **problem.config("newton_sums"))
    return sums.double(), kept.view(torch.bool) if keep else None


def newton_sums_pass(problem: TritonProblem, tiles: BlockMask, point, rows=None):
    """Newton sums at ``point`` over ``tiles`` (``triton_refine.newton_sums_kernel``), float64,
    on the query tiles with a row in ``rows`` (all when None); see
    ``torch_blockwise.newton_sums_pass``."""
    return _newton_sums(problem, tiles, point, rows, False, False)[0]


def newton_moments_pass(problem: TritonProblem, tiles: BlockMask, point, rows=None, keep: bool = False):
    """``torch_blockwise.newton_moments_pass`` (``triton_refine.newton_sums_kernel`` with
    ``COUNT``, and ``KEEP`` when ``keep``)."""
    return _newton_sums(problem, tiles, point, rows, True, keep)


def newton_step(state: S.NewtonState, sums: torch.Tensor, spec: EntmaxSpec, tolerance: float,
                step_tolerance: float) -> S.NewtonState:
    """``stats.newton_step`` in one launch (``triton_tau.newton_step_kernel``), in place (the
    state's point, lower and upper must not share memory)."""
    point, lower, upper = (x.to(torch.float64).contiguous() for x in state[:3])
    done = state.done.contiguous().view(torch.int8)
    constants = spec.kernel_constants(1.0, point.device)  # the step reads gamma alone
    launch(triton_tau.newton_step_kernel, (_cdiv(point.numel(), TAU_ROWS),))(
        Sums=sums.to(torch.float64).contiguous(), Point=point, Lower=lower, Upper=upper,
        Done=done, num_rows=point.numel(), seqlen_q=point.shape[-1], num_heads=point.shape[1],
        gamma=constants["gamma"], tolerance=float(tolerance), step_tolerance=float(step_tolerance), POWER=spec.power,
        SUMS=sums.shape[-1], BLOCK_R=TAU_ROWS, PER_HEAD=constants["PER_HEAD"], num_warps=TAU_WARPS)
    return S.NewtonState(point, lower, upper, done.view(torch.bool))


def newton_polish(problem: TritonProblem, tiles: BlockMask, state: S.NewtonState, steps: int) -> torch.Tensor:
    """``torch_blockwise.newton_polish`` in one launch (``triton_newton.newton_polish_kernel``),
    updating the state's point in place."""
    p = problem
    point, lower, upper = (x.to(torch.float64).contiguous() for x in state[:3])
    launch(triton_newton.newton_polish_kernel, p.query_grid)(
        **p.listed(tiles), Point=point, Lower=lower, Upper=upper,
        Done=state.done.contiguous().view(torch.int8), **p.weights, no_stop=S.NO_STOP, STEPS=steps,
        **p.config("newton_sums"))
    return point


CANDIDATES = 1024  # candidate slots per row (triton_candidates); 0: sweeps only
CANDIDATE_CHUNK = 64  # candidates read per row and trip of a step
PROGRAMS_PER_SM = 4  # the candidate kernel's persistent grid: programs per SM
# query tiles that list at most this many key tiles take the sweeps: none, since theirs are launches
# of their own after the candidate kernel, where the candidates cost no more (docs/design.md, candidate keys)
FEW_TILES = 0
# a query tile with a row of more candidates than CROWDED_FLOOR and than one in CROWDED_RATIO of
# its listed keys spills to the sweeps (flat rows: each Newton step on the candidates reads the
# longest row's count for every row of the tile); ratio 0: only past the slots. Closed forms only
# (alpha 1.5, 2): in the general form a sweep's step takes two logs a score, and there the rows of
# hundreds of candidates cost less on them (docs/design.md, candidate keys). The floor lies
# between the flat rows' counts, which the sweeps take more cheaply, and the local rows' few
# hundred, which the candidates do (docs/design.md, the floor's measures)
CROWDED_RATIO = 16
CROWDED_FLOOR = 384
# a query tile that lists at least SAMPLE_FROM key tiles with every pair visible gathers from
# SAMPLE_TILES of them, spread over the row, first; where a row's candidates there, scaled to its
# listed tiles, pass SAMPLE_MARGIN times the limit above, it spills before the rest of its gather
# (flat rows: their stores up to the limit are most of what the gather costs); SAMPLE_TILES 0: no
# sample
SAMPLE_TILES = 4
SAMPLE_FROM = 32
SAMPLE_MARGIN = 2
# the rest of the full tiles are gathered in GATHER_PARTS parts of at least GATHER_PART_TILES tiles, and
# a query tile with a row past its limit after a part gathers no further: it spills whatever the
# rest holds (flat rows the sample did not send to the sweeps); GATHER_PARTS 1: one part
GATHER_PARTS = 4
GATHER_PART_TILES = 8


def candidate_slots() -> int:
    """Per row, the candidate keys ``newton_schedule`` keeps on chip before it spills to sweeps:
    ``RING_ADASPLASH_CANDIDATES`` (0, or a multiple of ``CANDIDATE_CHUNK``; default ``CANDIDATES``)."""
    value = os.environ.get(CANDIDATES_ENV, str(CANDIDATES))
    if not value.isdigit() or int(value) % CANDIDATE_CHUNK:
        raise ValueError(f"{CANDIDATES_ENV} must be 0 or a multiple of {CANDIDATE_CHUNK}; got {value!r}")
    return int(value)


def _persistent_programs(device: torch.device, tiles: int) -> int:
    """Programs of a persistent grid over ``tiles`` work items: a few per SM (interpreted: three,
    so that programs take several tiles there too)."""
    if device.type != "cuda":
        return min(tiles, 3)
    return min(tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)


def newton_schedule(problem: TritonProblem, tiles: BlockMask, reference, row_max, tolerance: float,
                    step_tolerance: float, output: OutputRequest | None = None):
    """``torch_blockwise.newton_schedule``: first on each row's candidate keys
    (``triton_candidates.candidate_schedule_kernel``), then, on the query tiles with a row of more
    candidates than ``candidate_slots()``, in one sweep per step
    (``triton_newton.newton_schedule_kernel``). With ``output`` (and candidates), the candidate
    kernel also computes the output of the query tiles it finishes: ``(tau, keep, partial)``,
    ``partial`` a ``PartialOutput`` whose open query tiles are the spilled ones (else None)."""
    p = problem
    tau = torch.empty(p.rows, device=p.q.device, dtype=torch.float64)
    keep = torch.zeros(p.tiles, device=p.q.device, dtype=torch.int8)
    arguments = dict(**p.listed(tiles), Reference=p.per_row(reference), Row_max=p.per_row(row_max), Tau=tau,
                     Keep=keep, margin=S.MASK_MARGIN, tolerance=float(tolerance),
                     step_tolerance=float(step_tolerance), **p.weights, MAX_STEPS=S.NEWTON_SCHEDULE_STEPS,
                     NARROW_STEP=S.NEWTON_NARROW_STEP)
    slots = candidate_slots()
    spilled = keep  # not read without SPILLED_ONLY
    partial = None
    if slots:
        work = p.num_q_tiles * p.batch * p.heads
        programs = _persistent_programs(p.q.device, work)
        spilled = torch.empty(work, device=p.q.device, dtype=torch.int8)
        alpha = None
        if output is not None:
            sums = _output_tensors(p, output.backward_sums, output.out_dtype)
            if output.alpha_sums:
                alpha = AlphaSplit(torch.empty(sums[0].shape, device=p.q.device, dtype=torch.float32),
                                   p.empty_rows(), spilled.view(p.batch, p.heads, p.num_q_tiles))
            partial = PartialOutput(_output_sums(sums, output.backward_sums), spilled, alpha)
            output_arguments = dict(_output_arguments(p, sums), V=p.v, **_strides("v", p.v), OUTPUT=True,
                                    BACKWARD_SUMS=output.backward_sums)
        else:  # the output's pointers are never read
            output_arguments = dict(_output_arguments(p, (keep,) * 5), V=keep, **_strides("v", p.q), OUTPUT=False,
                                    BACKWARD_SUMS=False)
        # not read without ALPHA_SUMS
        output_arguments |= dict(Out_c=keep, C_sum=keep, ALPHA_SUMS=False) if alpha is None else \
            dict(Out_c=alpha.out_c, C_sum=alpha.c_sum, ALPHA_SUMS=True)
        launch(triton_candidates.candidate_schedule_kernel, (programs,))(
            **arguments, **output_arguments, Spilled=spilled,
            Cand=torch.empty(programs * BLOCK_M * (slots + BLOCK_N) * 2, device=p.q.device, dtype=torch.int32),
            num_q_tiles=p.num_q_tiles, num_tiles=work, few_tiles=FEW_TILES,
            crowded_ratio=CROWDED_RATIO if p.spec.closed_form else 0,
            crowded_floor=CROWDED_FLOOR, sample_from=max(SAMPLE_FROM, SAMPLE_TILES) if SAMPLE_TILES > 0 else 2**30,
            sample_margin=SAMPLE_MARGIN, gather_parts=max(GATHER_PARTS, 1), gather_part_tiles=max(GATHER_PART_TILES, 1),
            CANDIDATES=slots, CHUNK=CANDIDATE_CHUNK, SAMPLE_TILES=max(SAMPLE_TILES, 1),
            **p.config("candidates"))
    launch(triton_newton.newton_schedule_kernel, p.query_grid)(
        **arguments, Spilled=spilled, SPILLED_ONLY=bool(slots), UPPER_STEP=S.NEWTON_UPPER_STEP,
        COLUMN_STEPS=S.COLUMN_STEPS,
        COLUMN_MARGIN=S.FLOOR_MARGIN, **p.config("newton"))
    return tau, keep.view(torch.bool), partial


def _output_tensors(p: TritonProblem, backward_sums: bool, out_dtype) -> tuple:
    """``(out, out_u, u_sum, support, nonzero)`` for the output kernels to store into (``nonzero``
    uint8 zeros); without ``backward_sums`` ``out_u`` and ``u_sum`` are ``out`` and ``support``
    (the kernels store nothing there)."""
    shape = (p.batch, p.seqlen_q, p.heads, p.v.shape[-1])
    out = torch.empty(shape, device=p.q.device, dtype=out_dtype or torch.float32)
    support = p.empty_rows()
    out_u, u_sum = (torch.empty(shape, device=p.q.device, dtype=out.dtype), p.empty_rows()) if backward_sums \
        else (out, support)
    return out, out_u, u_sum, support, torch.zeros(p.tiles, device=p.q.device, dtype=torch.uint8)


def _output_sums(tensors: tuple, backward_sums: bool) -> OutputSums:
    out, out_u, u_sum, support, nonzero = tensors
    if not backward_sums:
        out_u = u_sum = None
    return OutputSums(out, out_u, u_sum, support, nonzero.view(torch.bool))


def _output_arguments(p: TritonProblem, tensors: tuple) -> dict:
    out, out_u, u_sum, support, nonzero = tensors
    return dict(Out=out, Out_u=out_u, U_sum=u_sum, Support=support, Nonzero=nonzero, **_strides("o", out))


def output_pass(problem: TritonProblem, tau, tiles: BlockMask, backward_sums: bool = True,
                out_dtype=None, partial: PartialOutput | None = None) -> OutputSums:
    """sum p v, with ``backward_sums`` sum u v and sum u, support and nonzero tiles over ``tiles``
    (``triton_output.output_kernel``), summed in float32 (why: docs/design.md (kernel choices)) and
    stored so, ``out`` and sum u v in ``out_dtype`` where given. With ``partial`` (from
    ``newton_schedule``) only its open query tiles, into its tensors."""
    p = problem
    if partial is None:
        tensors, spilled = _output_tensors(p, backward_sums, out_dtype), None
    else:
        sums = partial.sums
        if (sums.out_u is not None) != backward_sums or sums.out.dtype != (out_dtype or torch.float32):
            raise ValueError("partial output computed for another output request")
        tensors = (sums.out, sums.out if sums.out_u is None else sums.out_u,
                   sums.support if sums.u_sum is None else sums.u_sum, sums.support, sums.nonzero.view(torch.uint8))
        spilled = partial.open
    launch(triton_output.output_kernel, p.query_grid)(
        **p.listed(tiles), V=p.v, **_strides("v", p.v), Tau=p.per_row(tau), **_output_arguments(p, tensors),
        Spilled=tensors[4] if spilled is None else spilled, SPILLED_ONLY=spilled is not None, **p.weights,
        BACKWARD_SUMS=backward_sums, **p.config("output"))
    return _output_sums(tensors, backward_sums)


def _dq(problem: TritonProblem, grad_out, tau, tiles: BlockMask, delta, out_u=None, u_sum=None,
        alpha_sums=None, dtype=torch.float32, alpha_split: AlphaSplit | None = None) -> torch.Tensor:
    """dq (B, Sq, Hq, D) in ``dtype`` (``triton_backward.dq_kernel``: float32 sums, one cast at
    the store; why float32: docs/design.md (kernel choices)); with ``out_u`` and ``u_sum``, it also
    computes ``delta`` into ``delta``; with ``alpha_sums`` (B, H, Sq) float32, the row sums
    ``Gradients.alpha_sums`` into it (from ``alpha_split``'s on the query tiles it covers)."""
    p, compute_delta = problem, out_u is not None
    dq = torch.empty(p.batch, p.seqlen_q, p.heads, p.head_dim, device=p.q.device, dtype=dtype)
    out_u_strides = _strides("o", out_u) if compute_delta else {f"stride_o{axis}": 0 for axis in "bshd"}
    if alpha_split is None:  # not read without ALPHA_SPLIT
        split = dict(Out_c=dq, C_sum=dq, Alpha_open=dq)
    else:  # sum c v is read with out_u's strides
        if not compute_delta or alpha_split.out_c.stride() != out_u.stride():
            raise ValueError("alpha_split needs delta computed here and out_c laid out as out_u")
        split = dict(Out_c=alpha_split.out_c, C_sum=p.per_row(alpha_split.c_sum),
                     Alpha_open=alpha_split.open.to(device=p.q.device, dtype=torch.int8).contiguous())
    arguments = dict(
        **p.listed(tiles), V=p.v, DO=grad_out, Tau=tau, Out_u=out_u if compute_delta else delta,
        U_sum=u_sum if compute_delta else delta, Delta=delta, DQ=dq,
        Alpha_sums=dq if alpha_sums is None else alpha_sums, **split, **_strides("v", p.v),
        **_strides("do", grad_out), **out_u_strides, **_strides("dq", dq), softmax_scale=float(p.softmax_scale),
        **p.weights, COMPUTE_DELTA=compute_delta, ALPHA_SUMS=alpha_sums is not None, **p.config("dq", grad_out))
    # split: the query tiles the forward finished, then the open ones, each launch its own loop
    kinds = (triton_backward.SPLIT_FINISHED, triton_backward.SPLIT_OPEN) if alpha_split is not None else \
        (triton_backward.SPLIT_NONE,)
    for kind in kinds:
        launch(triton_backward.dq_kernel, p.query_grid)(**arguments, ALPHA_SPLIT=int(kind))
    return dq


NAN_KEYS_TILES = 8  # query tiles per program of ``triton_backward.nan_keys_kernel``


def _nan_keys(problem: TritonProblem, tau) -> torch.Tensor:
    """(B, Sk, Hkv) int8: 1 at the keys that a row whose ``tau`` (per row) is NaN sees
    (``triton_backward.nan_keys_kernel``)."""
    p = problem
    nan_keys = torch.zeros(p.batch, p.seqlen_k, p.heads_kv, device=p.k.device, dtype=torch.int8)
    launch(triton_backward.nan_keys_kernel, (triton.cdiv(p.num_q_tiles, NAN_KEYS_TILES), p.batch * p.heads))(
        Tau=tau, **p.visibility, K_tile_lo=p.ranges["K_tile_lo"], K_tile_hi=p.ranges["K_tile_hi"], Nan_keys=nan_keys,
        seqlen_q=p.seqlen_q, seqlen_k=p.seqlen_k, num_heads=p.heads, num_heads_kv=p.heads_kv,
        num_q_tiles=p.num_q_tiles, GROUP=p.group, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, TILES=NAN_KEYS_TILES)
    return nan_keys


def _dkdv(problem: TritonProblem, grad_out, tau, tiles: BlockMask, delta, dtype) -> tuple:
    """dk and dv (B, Sk, Hkv, D) in ``dtype`` (``triton_backward.dkdv_kernel``: float32 sums, one
    cast at the store), NaN on the keys that a row whose tau is NaN sees (``_nan_keys``)."""
    p = problem
    dk = torch.empty(p.k.shape, device=p.k.device, dtype=dtype)
    dv = torch.empty(p.v.shape, device=p.v.device, dtype=dtype)
    counts_t, index_t = tiles.query_tile_lists()
    launch(triton_backward.dkdv_kernel, (p.num_k_tiles, p.batch * p.heads_kv))(
        **p.queries, **p.query_ranges, V=p.v, DO=grad_out,
        Tile_count=counts_t, Tile_index=index_t, list_width=index_t.shape[-1], Shift=p.shift_rows, Tau=tau,
        Delta=delta, Nan_keys=_nan_keys(p, tau), DK=dk, DV=dv,
        **_strides("v", p.v), **_strides("do", grad_out), **_strides("dk", dk), num_heads_kv=p.heads_kv,
        num_q_tiles=p.num_q_tiles, softmax_scale=float(p.softmax_scale), **p.weights, **p.config("dkdv", grad_out))
    return dk, dv


def backward_pass(problem: TritonProblem, grad_out, tau, tiles: BlockMask, delta=None, out_u=None, u_sum=None,
                  kv_grad_dtype=None, alpha_sums: bool = False, q_grad_dtype=None,
                  alpha_split: AlphaSplit | None = None) -> Gradients:
    """dq (B, Sq, Hq, D) in ``q_grad_dtype``, dk and dv (B, Sk, Hkv, D) in ``kv_grad_dtype`` (default
    float32), and delta (B, Hq, Sq), through ``tiles``. ``delta`` None: the dQ kernel computes it
    from ``out_u`` and ``u_sum`` (``torch_blockwise.row_delta``) for its rows, before the dK/dV
    kernel reads it. ``alpha_sums``: the dQ kernel also sums ``Gradients.alpha_sums``, from
    ``alpha_split`` on the query tiles it covers (it needs ``delta`` None). The keys that rows
    whose tau is NaN see get NaN dk and dv (``_nan_keys``: a memset and a launch whether or not
    such a row exists; no host sync)."""
    grad_out = grad_out.to(problem.q.dtype)
    tau = problem.per_row(tau)
    tiles.query_tile_lists(problem.query_spans)  # both directions of the tile lists from one launch
    sums = problem.empty_rows() if alpha_sums else None
    if delta is None:
        delta = problem.empty_rows()
        dq = _dq(problem, grad_out, tau, tiles, delta, out_u, u_sum.to(torch.float32).contiguous(),
                 sums, q_grad_dtype or torch.float32, alpha_split if alpha_sums else None)
    else:
        if alpha_split is not None:
            raise ValueError("alpha_split needs the row term computed here (delta None)")
        delta = problem.per_row(delta)
        dq = _dq(problem, grad_out, tau, tiles, delta, alpha_sums=sums, dtype=q_grad_dtype or torch.float32)
    dk, dv = _dkdv(problem, grad_out, tau, tiles, delta, kv_grad_dtype or torch.float32)
    return Gradients(dq, dk, dv, delta, sums)


def coarse_bracket(stats: S.RowStats, spec: EntmaxSpec) -> S.Bracket:
    """``stats.coarse_bracket`` in one launch (``triton_tau.bracket_kernel``) for alpha 1.5 and 2
    (``estimate`` and ``upper``, which only the Newton path reads, are left None); other alpha:
    ``stats.coarse_bracket``."""
    if not spec.closed_form:
        return S.coarse_bracket(stats, spec)
    row_max = stats.row_max.to(torch.float32).contiguous()
    lower = torch.empty_like(row_max)
    bin_index = torch.empty(row_max.shape, device=row_max.device, dtype=torch.float64)
    single = torch.empty(row_max.shape, device=row_max.device, dtype=torch.int8)
    launch(triton_tau.bracket_kernel, (_cdiv(row_max.numel(), TAU_ROWS),))(
        Row_max=row_max, Hist=stats.hist.contiguous(), Lower=lower, Bin_index=bin_index, Single=single,
        num_rows=row_max.numel(), NUM_BINS=S.NUM_BINS, POWER=spec.power, BLOCK_R=TAU_ROWS, num_warps=TAU_WARPS)
    return S.Bracket(lower, bin_index, None, None, torch.isneginf(row_max), single.view(torch.bool))


def fine_tau(bracket: S.Bracket, fine: torch.Tensor, spec: EntmaxSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_blockwise.fine_tau`` in one launch (``triton_tau.fine_tau_kernel``)."""
    tau = torch.empty(bracket.bin_index.shape, device=fine.device, dtype=torch.float32)
    exact = torch.empty(tau.shape, device=fine.device, dtype=torch.int8)
    launch(triton_tau.fine_tau_kernel, (_cdiv(tau.numel(), FINE_TAU_ROWS),))(
        Bin_index=bracket.bin_index.to(torch.float64).contiguous(), Empty=bracket.empty.contiguous(),
        Single=bracket.single.contiguous(), Lower=bracket.lower.to(torch.float32).contiguous(),
        Fine=fine.contiguous(), Tau=tau, Exact=exact, num_rows=tau.numel(), NUM_BINS=S.NUM_BINS,
        FINE_BINS=S.FINE_BINS, POWER=spec.power, BLOCK_R=FINE_TAU_ROWS, num_warps=FINE_TAU_WARPS)
    return tau, exact.view(torch.bool)


ENTMAX_ROW_BLOCK = 8192  # rows up to this length stay in registers (``triton_entmax``)
# by POWER (one alpha: never POWER_BY_HEAD): the sparsemax iteration gains a key a step on flat rows
ENTMAX_MAX_STEPS = {1: 64, 2: 32, POWER_GENERAL: 32, POWER_GENERAL_EXACT_LOG: 32}
ENTMAX_TOLERANCE = 1e-7  # in z: a step this small leaves an error of about its square


def entmax_rows(x: torch.Tensor, alpha: float, row_block: int = ENTMAX_ROW_BLOCK) -> torch.Tensor:
    """alpha-entmax of every row of ``x`` (rows, n), float32 out (``triton_entmax.entmax_rows_kernel``);
    ``row_block``: the longest row kept in registers (longer ones are read block by block)."""
    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel walks a row's entries one after another
    rows, num_cols = x.shape
    spec = EntmaxSpec(alpha)
    p = torch.empty(rows, num_cols, device=x.device, dtype=torch.float32)
    if p.numel() == 0:
        return p
    block = min(triton.next_power_of_2(num_cols), row_block)
    launch(triton_entmax.entmax_rows_kernel, (rows,))(
        X=x, P=p, num_cols=num_cols, stride_x=x.stride(0), stride_p=p.stride(0), scale_z=alpha - 1.0,
        gamma=float(spec.gamma), tolerance=ENTMAX_TOLERANCE, POWER=spec.power, BLOCK=block,
        ONE_BLOCK=num_cols <= block, MAX_STEPS=ENTMAX_MAX_STEPS[spec.power], num_warps=min(16, max(1, block // 256)))
    return p
