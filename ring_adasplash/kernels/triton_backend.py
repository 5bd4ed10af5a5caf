"""Triton backend: launchers of the four passes, with the contract of ``torch_blockwise``.

Inputs come in the public layout (B, S, H, D) with any strides (passed per axis, never copied);
statistics are head-major (B, H, Sq, ...) and contiguous. GQA: query head ``h`` reads key head
``h // (Hq // Hkv)``. The kernels live in ``triton_stats``, ``triton_refine``, ``triton_output``,
``triton_backward`` and ``triton_tau`` (tau from the statistics, in place of the float64 PyTorch
math of ``stats`` for alpha 1.5 and 2); this module builds their small side inputs (per query tile, the range of key
tiles with visible pairs; compact lists of the tiles each program visits) and picks launch
configurations (a fixed table: no autotuning, so a first call compiles each kernel once).

CPU tensors run the same kernels under Triton's interpreter (``TRITON_INTERPRET=1``, read when the
kernel modules are imported). The interpreter multiplies 16-bit floats wrongly in ``tl.dot``
(it treats bfloat16 storage as integers), so there every dot operand is first rounded to the input
dtype, as on the GPU, and then multiplied in float32 (``DOT_F32``), which gives what the GPU's
tensor cores compute for 16-bit operands (exact products, float32 sums). float32 inputs multiply in
IEEE float32 on both (``input_precision="ieee"``: no TF32). float64 inputs run ``torch_blockwise``.
"""
from __future__ import annotations

import os

import torch
import triton

from . import stats as S
from . import torch_blockwise, triton_backward, triton_output, triton_refine, triton_stats, triton_tau, triton_tiles
from .compile_ahead import launch
from .visibility import Visibility, first_true, key_tile_span

NAME = "triton"
BLOCK_M = 64  # query rows per tile, in every kernel and in the block mask
BLOCK_N = 64  # keys per tile
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# rows and warps per program of the tau kernels: the bracket keeps every bin of its rows in
# registers (one H200, 32K tokens, 16 heads: 0.034 ms with 32 x 4, 0.055 with 16 x 4); fine tau
# walks the sub-bins with a thread per row (one H100, 8K tokens, 16 heads: 0.09 ms with 16 x 1,
# 0.21 with 32 x 1, 64 x 2 or 128 x 4; 32K: 0.33 ms with 16 x 1, 1.8 with 32 x 1)
TAU_ROWS = 32
TAU_WARPS = 4
FINE_TAU_ROWS = 16
FINE_TAU_WARPS = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _alpha_mode(alpha: float) -> int:
    return 0 if alpha == 1.5 else 1 if alpha == 2.0 else 2


def _gamma(alpha) -> float:
    return 1.0 / (float(alpha) - 1.0) if alpha is not None else 0.0


def _runs_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flags(q: torch.Tensor) -> dict:
    """Constexpr switches shared by every kernel launch."""
    if not _runs_kernels(q):
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (set before the kernel "
                           "modules are imported) to run on CPU tensors; or use RING_ADASPLASH_BACKEND=torch")
    return {"DOT_F32": not q.is_cuda, "IEEE": q.dtype == torch.float32}


def _config(head_dim: int, kind: str) -> dict:
    """num_warps / num_stages per pass (a small fixed table; no autotuning)."""
    if kind == "backward":
        return {"num_warps": 8 if head_dim >= 128 else 4, "num_stages": 1 if head_dim >= 256 else 2}
    if kind == "stats":
        return {"num_warps": 8 if head_dim >= 256 else 4, "num_stages": 2}
    if kind == "output":  # one H100, 32K, D 64: 2.28 ms with 2 stages against 2.60 with 3
        return {"num_warps": 8 if head_dim >= 256 else 4, "num_stages": 2}
    return {"num_warps": 8 if head_dim >= 256 else 4, "num_stages": 2 if head_dim >= 256 else 3}


def _check(q, k, block_m, block_n):
    if (block_m, block_n) != (BLOCK_M, BLOCK_N):
        raise ValueError(f"the Triton kernels use {BLOCK_M}x{BLOCK_N} tiles; got {block_m}x{block_n}")
    dim = q.shape[-1]
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {dim} is not supported by the Triton kernels; expected one of "
                         f"{SUPPORTED_HEAD_DIMS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads of q ({q.shape[2]}) must be a multiple of heads of k ({k.shape[2]})")


def _vis_args(vis: Visibility, device):
    return [t.to(device=device, dtype=torch.int32).contiguous() for t in (vis.q_limit, vis.q_doc, vis.k_pos, vis.k_doc)]


TILE_LIST_CHUNK = 1024  # mask entries per step of a tile-list program


def _tile_lists(mask: torch.Tensor, columns_too: bool = False):
    """(..., rows, cols) bool -> counts (..., rows) int32 and indices (..., rows, cols) int32: the
    True positions of each row first, ascending (``triton_tiles.tile_list_kernel``; slots past a
    row's count are unset). ``columns_too``: also the lists of the transposed mask, counts
    (..., cols) and indices (..., cols, rows), from the same launch."""
    grouped = mask.view(torch.uint8).reshape(-1, *mask.shape[-2:])
    groups, rows, cols = grouped.shape
    counts = torch.empty(mask.shape[:-1], device=mask.device, dtype=torch.int32)
    index = torch.empty(mask.shape, device=mask.device, dtype=torch.int32)
    lists = [counts, index]
    if columns_too:
        lists += [torch.empty((*mask.shape[:-2], cols), device=mask.device, dtype=torch.int32),
                  torch.empty((*mask.shape[:-2], cols, rows), device=mask.device, dtype=torch.int32)]
    if counts.numel():
        columns = lists[2:] or lists  # unused by a grid of depth 1
        launch(triton_tiles.tile_list_kernel, (max(rows, cols) if columns_too else rows, groups, 1 + columns_too))(
            grouped, counts, index, *columns, *grouped.stride(), rows, cols,
            CHUNK=min(TILE_LIST_CHUNK, triton.next_power_of_2(max(rows, cols, 16))), num_warps=4,
        )
    return tuple(lists)


_RANGES_CACHE: dict = {}  # where the four visibility vectors live, and their versions -> (vectors, ranges)
RANGES_CACHE_SIZE = 16


def _key_tile_ranges(vis: Visibility, device):
    """``_compute_key_tile_ranges``, remembered for the last few visibility rules: some forty small
    ops that would otherwise run on every call (most of a forward's launches at 8K tokens). The
    key is each vector's memory, layout and version counter; the entry holds the vectors, so that
    memory cannot be handed to other tensors while it lives, and an in-place change misses."""
    tensors = (vis.q_limit, vis.q_doc, vis.k_pos, vis.k_doc)
    key = (str(device),) + tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t._version) for t in tensors)
    hit = _RANGES_CACHE.get(key)
    if hit is None:
        if len(_RANGES_CACHE) >= RANGES_CACHE_SIZE:
            _RANGES_CACHE.pop(next(iter(_RANGES_CACHE)))
        hit = _RANGES_CACHE[key] = (tensors, _compute_key_tile_ranges(vis, device))
    return hit[1]


def remembered() -> list:
    """Every tensor the launchers keep between calls (``_key_tile_ranges``). A captured CUDA graph
    reads them by address, so it holds this list: an entry dropped from the cache stays alive."""
    return list(_RANGES_CACHE.values())


def _compute_key_tile_ranges(vis: Visibility, device):
    """Per query tile (int32, (nQ,) each): key tiles [lo, hi) spanning every tile that may hold a
    visible pair (``visibility.tile_visible``; tiles in between with none come out -inf), and a run
    [full_lo, full_hi) of tiles whose every pair is visible (no per-element mask needed)."""
    lo, hi = (t.to(device) for t in key_tile_span(vis, BLOCK_M, BLOCK_N))
    num_k_tiles = -(-vis.seqlen_k // BLOCK_N)
    pos = torch.arange(num_k_tiles, device=device)

    def tiles(x, block, fill):
        pad = (-x.shape[0]) % block
        return torch.nn.functional.pad(x.to(device=device, dtype=torch.int64), (0, pad), value=fill).view(-1, block)

    big = 2**40
    q_limit, q_doc = tiles(vis.q_limit, BLOCK_M, -big), tiles(vis.q_doc, BLOCK_M, -big)
    k_pos, k_doc = tiles(vis.k_pos, BLOCK_N, big), tiles(vis.k_doc, BLOCK_N, big)
    one_q_doc = q_doc.amin(1) == q_doc.amax(1)
    one_k_doc = k_doc.amin(1) == k_doc.amax(1)
    full = ((k_pos.amax(1)[None, :] <= q_limit.amin(1)[:, None]) & one_q_doc[:, None] & one_k_doc[None, :]
            & (q_doc.amin(1)[:, None] == k_doc.amin(1)[None, :]))
    full_lo = first_true(full, num_k_tiles)
    full_hi = first_true(~full & (pos[None, :] >= full_lo[:, None]), num_k_tiles)
    return [t.to(torch.int32).contiguous() for t in (lo, hi, full_lo, full_hi)]


def _power(gamma: float) -> int:
    """Constexpr switch of ``triton_stats.power``: the exponent when it is 1 or 2, else 0."""
    return int(gamma) if gamma in (1.0, 2.0) else 0


def max_pass(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, alpha: float | None, row_max=None,
             tau_floor=None) -> S.Maxima:
    """Row max, tau floor (``tau_floor_kernel``) and tile gaps (the dense sweep, ``stats_kernel``);
    see ``torch_blockwise.max_pass``."""
    if q.dtype == torch.float64:
        return torch_blockwise.max_pass(q, k, vis, scale_z, block_m, block_n, alpha, row_max, tau_floor)
    _check(q, k, block_m, block_n)
    batch, seqlen_q, heads, dim = q.shape
    heads_kv = k.shape[2]
    num_q_tiles, num_k_tiles = _cdiv(seqlen_q, BLOCK_M), _cdiv(k.shape[1], BLOCK_N)
    grid = (num_q_tiles, batch * heads)
    common = dict(GROUP=heads // heads_kv, HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **_flags(q),
                  **_config(dim, "stats"))
    vis_args, ranges = _vis_args(vis, q.device), _key_tile_ranges(vis, q.device)
    if tau_floor is not None:
        floor = tau_floor.to(device=q.device, dtype=torch.float32).contiguous()
    elif alpha is None:  # no floor
        floor = torch.full((batch, heads, seqlen_q), float("-inf"), device=q.device)
    else:
        floor = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
        gamma = _gamma(alpha)
        launch(triton_stats.tau_floor_kernel, grid)(
            q, k, *vis_args, *ranges[:2], floor, *q.stride(), *k.stride(),
            seqlen_q, k.shape[1], heads, float(scale_z), gamma,
            POWER=_power(gamma), STEPS=S.FLOOR_STEPS, MARGIN=S.FLOOR_MARGIN, **common,
        )
    if row_max is None:
        running = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
    else:
        running = row_max.to(device=q.device, dtype=torch.float32, copy=True).contiguous()
    tile_gap = torch.full((batch, heads, num_q_tiles, num_k_tiles), float("-inf"), device=q.device)
    launch(triton_stats.stats_kernel, grid)(
        q, k, *vis_args, *ranges, running, floor, tile_gap, *q.stride(), *k.stride(),
        seqlen_q, k.shape[1], heads, num_k_tiles, float(scale_z), HAS_ROW_MAX=row_max is not None, **common,
    )
    return S.Maxima(running, floor, tile_gap)


def histogram_pass(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, row_max, tile_gap, active,
                   tau_floor=None):
    """Coarse counts over the ``active`` tiles (``triton_refine.histogram_kernel``), which also
    marks the tiles where some row has a key in its own kept bins; every other visible tile gets
    ``ZERO_TILE`` (``tile_gap`` is updated in place). See ``torch_blockwise.histogram_pass``."""
    if q.dtype == torch.float64:
        return torch_blockwise.histogram_pass(q, k, vis, scale_z, block_m, block_n, row_max, tile_gap, active,
                                              tau_floor)
    _check(q, k, block_m, block_n)
    batch, seqlen_q, heads, dim = q.shape
    heads_kv = k.shape[2]
    num_q_tiles, num_k_tiles = _cdiv(seqlen_q, BLOCK_M), _cdiv(k.shape[1], BLOCK_N)
    counts, index = _tile_lists(active)
    hist = torch.empty(batch, heads, seqlen_q, S.NUM_BINS, device=q.device, dtype=torch.float32)
    near = torch.zeros(tile_gap.shape, device=q.device, dtype=torch.int8)
    if tau_floor is None:  # no floor: every bin kept
        tau_floor = torch.full_like(row_max, float("-inf"))
    launch(triton_refine.histogram_kernel, (num_q_tiles, batch * heads))(
        q, k, *_vis_args(vis, q.device), *_key_tile_ranges(vis, q.device)[2:], counts, index,
        row_max.to(torch.float32).contiguous(), tau_floor.to(device=q.device, dtype=torch.float32).contiguous(),
        hist, near, *q.stride(), *k.stride(),
        seqlen_q, k.shape[1], heads, num_k_tiles, float(scale_z), S.HISTOGRAM_MARGIN,
        GROUP=heads // heads_kv, HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_BINS=S.NUM_BINS,
        **_flags(q), **_config(dim, "refine"),
    )
    return hist, tile_gap.masked_fill_((near == 0) & torch.isfinite(tile_gap), S.ZERO_TILE)


def refine_pass(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, active, *,
                bin_index=None, low=None, point=None, alpha=None):
    """Fine histogram, moments above it and kept tiles (``bin_index``) or Newton sums (``point``,
    ``alpha``) over active tiles; see ``torch_blockwise.refine_pass``."""
    if q.dtype == torch.float64:
        return torch_blockwise.refine_pass(q, k, vis, scale_z, block_m, block_n, active, bin_index=bin_index,
                                           low=low, point=point, alpha=alpha)
    _check(q, k, block_m, block_n)
    flags = _flags(q)
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    num_q_tiles, num_k_tiles = _cdiv(seqlen_q, BLOCK_M), _cdiv(seqlen_k, BLOCK_N)
    newton = bin_index is None
    counts, index = _tile_lists(active)
    target = (point if newton else bin_index).to(device=q.device, dtype=torch.float32).contiguous()
    low = target if newton else (torch.full_like(target, float("-inf")) if low is None
                                 else low.to(device=q.device, dtype=torch.float32).contiguous())
    shape = (batch, heads, seqlen_q) + ((2,) if newton else (3, S.FINE_BINS + 1))
    out = torch.empty(shape, device=q.device, dtype=torch.float32)  # every program writes its rows
    keep = torch.zeros(active.shape, device=q.device, dtype=torch.int8)
    launch(triton_refine.refine_kernel, (num_q_tiles, batch * heads))(
        q, k, *_vis_args(vis, q.device), *_key_tile_ranges(vis, q.device)[2:], counts, index, target, low, out,
        keep,
        *q.stride(), *k.stride(),
        seqlen_q, seqlen_k, heads, num_k_tiles, float(scale_z), _gamma(alpha),
        GROUP=heads // heads_kv, HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_BINS=S.NUM_BINS,
        FINE_BINS=S.FINE_BINS, MODE=1 if newton else 0, ROW_BLOCK=triton.next_power_of_2(3 * (S.FINE_BINS + 1)),
        **flags,
        **_config(dim, "refine"),
    )
    return (out.double(), None) if newton else (out, keep.view(torch.bool))


def output_pass(q, k, v, vis: Visibility, scale_z: float, alpha: float, tau, block_m: int, block_n: int, active):
    """sum p v, sum u v, sum u, support and nonzero tiles over active tiles. All float32: storing
    ``out`` in 16 bits from this kernel slowed it (one H100, 32K tokens, D 64, 83% block sparsity:
    2.54 against 1.99 ms) far more than the cast after costs."""
    if q.dtype == torch.float64:
        return torch_blockwise.output_pass(q, k, v, vis, scale_z, alpha, tau, block_m, block_n, active)
    _check(q, k, block_m, block_n)
    flags = _flags(q)
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    num_q_tiles, num_k_tiles = _cdiv(seqlen_q, BLOCK_M), _cdiv(seqlen_k, BLOCK_N)
    counts, index = _tile_lists(active)
    out = torch.empty(batch, seqlen_q, heads, v.shape[-1], device=q.device, dtype=torch.float32)
    out_u = torch.empty_like(out)
    u_sum = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
    support = torch.empty_like(u_sum)
    nonzero = torch.zeros(batch, heads, num_q_tiles, num_k_tiles, device=q.device, dtype=torch.uint8)
    launch(triton_output.output_kernel, (num_q_tiles, batch * heads))(
        q, k, v, *_vis_args(vis, q.device), *_key_tile_ranges(vis, q.device)[2:], counts, index,
        tau.to(device=q.device, dtype=torch.float32).contiguous(),
        out, out_u, u_sum, support, nonzero,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        seqlen_q, seqlen_k, heads, num_k_tiles, float(scale_z), _gamma(alpha),
        GROUP=heads // heads_kv, HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ALPHA_MODE=_alpha_mode(alpha),
        **flags, **_config(dim, "output"),
    )
    return out, out_u, u_sum, support, nonzero.view(torch.bool)


def backward_pass(q, k, v, grad_out, vis: Visibility, scale_z: float, softmax_scale: float, alpha: float,
                  tau, delta, block_m: int, block_n: int, active, kv_grad_dtype=None, out_u=None, u_sum=None):
    """dq (B, Sq, Hq, D) float32, dk and dv (B, Sk, Hkv, D) in ``kv_grad_dtype`` (default float32;
    the kernel accumulates in float32 and casts once, at the store), and delta (B, Hq, Sq), through
    the tiles in ``active``. ``delta`` None: the dQ kernel computes it from ``out_u`` and ``u_sum``
    (``torch_blockwise.row_delta``) for its rows, before the dK/dV kernel reads it. dq stays
    float32: a 16-bit store slowed the dq kernel (one H100, 32K tokens, D 64, 83% block sparsity:
    1.87 against 1.48 ms) more than the cast after costs; the dk/dv kernel lost 0.09 ms and saved
    two casts of about 0.07 ms each."""
    if q.dtype == torch.float64:
        return torch_blockwise.backward_pass(q, k, v, grad_out, vis, scale_z, softmax_scale, alpha, tau, delta,
                                             block_m, block_n, active, kv_grad_dtype, out_u, u_sum)
    _check(q, k, block_m, block_n)
    flags = _flags(q)
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    num_q_tiles, num_k_tiles = _cdiv(seqlen_q, BLOCK_M), _cdiv(seqlen_k, BLOCK_N)
    grad_out = grad_out.to(q.dtype)
    tau = tau.to(device=q.device, dtype=torch.float32).contiguous()
    compute_delta = delta is None
    if compute_delta:
        out_u = out_u.to(torch.float32)
        u_sum = u_sum.to(torch.float32).contiguous()
        delta = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
    else:
        delta = delta.to(device=q.device, dtype=torch.float32).contiguous()
        out_u = u_sum = delta  # not read
    vis_args = _vis_args(vis, q.device)
    common = dict(GROUP=heads // heads_kv, HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  ALPHA_MODE=_alpha_mode(alpha), **flags, **_config(dim, "backward"))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    # (B, Hq, nQ) key tiles per query tile, and (B, Hq, nK) query tiles per key tile
    counts, index, counts_t, index_t = _tile_lists(active, columns_too=True)

    dq = torch.empty(batch, seqlen_q, heads, dim, device=q.device, dtype=torch.float32)
    launch(triton_backward.dq_kernel, (num_q_tiles, batch * heads))(
        q, k, v, grad_out, *vis_args, counts, index, tau, out_u, u_sum, delta, dq,
        *strides, *(out_u.stride() if compute_delta else (0, 0, 0, 0)), *dq.stride(),
        seqlen_q, seqlen_k, heads, num_k_tiles, float(scale_z), float(softmax_scale), _gamma(alpha),
        COMPUTE_DELTA=compute_delta, **common,
    )
    dk = torch.empty(k.shape, device=k.device, dtype=kv_grad_dtype or torch.float32)
    dv = torch.empty(v.shape, device=v.device, dtype=kv_grad_dtype or torch.float32)
    launch(triton_backward.dkdv_kernel, (num_k_tiles, batch * heads_kv))(
        q, k, v, grad_out, *vis_args, counts_t, index_t, tau, delta, dk, dv,
        *strides, *dk.stride(),
        seqlen_q, seqlen_k, heads, heads_kv, num_q_tiles, float(scale_z), float(softmax_scale), _gamma(alpha),
        **common,
    )
    return dq, dk, dv, delta


def coarse_bracket(stats: S.RowStats, alpha: float) -> S.Bracket:
    """``stats.coarse_bracket`` in one launch (``triton_tau.bracket_kernel``) for alpha 1.5 and 2;
    ``estimate`` and ``upper``, which only the Newton path reads, are left None."""
    if not (S.is_closed_form(alpha) and stats.hist.dtype == torch.float32 and _runs_kernels(stats.hist)):
        return S.coarse_bracket(stats, alpha)
    row_max = stats.row_max.to(torch.float32).contiguous()
    lower = torch.empty_like(row_max)
    bin_index = torch.empty(row_max.shape, device=row_max.device, dtype=torch.float64)
    single = torch.empty(row_max.shape, device=row_max.device, dtype=torch.int8)
    num_rows = row_max.numel()
    launch(triton_tau.bracket_kernel, (_cdiv(num_rows, TAU_ROWS),))(
        row_max, stats.hist.contiguous(), lower, bin_index, single, num_rows,
        NUM_BINS=S.NUM_BINS, GAMMA=round(_gamma(alpha)), BLOCK_R=TAU_ROWS, num_warps=TAU_WARPS,
    )
    return S.Bracket(lower, bin_index, None, None, torch.isneginf(row_max), single.view(torch.bool))


def fine_tau(bracket: S.Bracket, fine_hist: torch.Tensor, alpha: float) -> torch.Tensor:
    """``stats.fine_tau`` in one launch (``triton_tau.fine_tau_kernel``)."""
    if not (fine_hist.dtype == torch.float32 and _runs_kernels(fine_hist)):
        return S.fine_tau(bracket, fine_hist, alpha)
    tau = torch.empty(bracket.bin_index.shape, device=fine_hist.device, dtype=torch.float32)
    num_rows = tau.numel()
    launch(triton_tau.fine_tau_kernel, (_cdiv(num_rows, FINE_TAU_ROWS),))(
        bracket.bin_index.to(torch.float64).contiguous(), bracket.empty.contiguous(), bracket.single.contiguous(),
        bracket.lower.to(torch.float32).contiguous(), fine_hist.contiguous(), tau, num_rows,
        NUM_BINS=S.NUM_BINS, FINE_BINS=S.FINE_BINS, GAMMA=round(_gamma(alpha)), BLOCK_R=FINE_TAU_ROWS,
        num_warps=FINE_TAU_WARPS,
    )
    return tau
