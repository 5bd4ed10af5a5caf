"""The blockwise algorithm in plain PyTorch: the CPU backend, and the spec the Triton kernels follow.

Implements ``backend.Backend``. Each pass walks the key block one tile of ``block_n`` keys at a
time with every query at once, so memory is O(Sq * block_n), never O(Sq * Sk). Tensors come in
the public layout (batch, seqlen, heads, head_dim); statistics are head-major (batch, heads,
seqlen, ...). Logits ``z = (alpha - 1) * softmax_scale * (q . k - shift)``, relative to the row's
score max (``stats.Relative``); the max pass reads raw scores. See ``stats.py`` for the
statistics. float64 inputs compute in float64, everything else in float32.
"""
from __future__ import annotations

import torch

from . import stats
from .backend import AlphaSplit, Gradients, Maxima, OutputRequest, OutputSums, PartialOutput, Problem
from .block_mask import BlockMask
from .entmax_spec import EntmaxSpec
from .visibility import Visibility, key_tile_span, keys_seen_by

NAME = "torch"
BLOCK_M = 64  # query rows per tile of the block mask
BLOCK_N = 64  # keys per tile
SUPPORTED_HEAD_DIMS = None  # any head dim
coarse_bracket = stats.coarse_bracket  # tau from the statistics: the backend-neutral float64 math


def problem(q, k, v, vis: Visibility, spec: EntmaxSpec, softmax_scale: float, shift=None) -> Problem:
    return Problem(q, k, v, vis, spec, softmax_scale, BLOCK_M, BLOCK_N, shift)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_major_queries(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, Sq, Hq, D) -> (B, Hkv, G, Sq, D) so one key head serves its G query heads (GQA)."""
    batch, seqlen, heads, dim = q.shape
    return q.to(_compute_dtype(q)).permute(0, 2, 1, 3).reshape(batch, heads_kv, heads // heads_kv, seqlen, dim)


class _KeyTiles:
    """Logits ``scale_z * (q . k - shift)`` of all queries against one key tile at a time, with
    invisible pairs and pairs outside ``tiles`` at -inf; ``raw``: the raw scores ``q . k`` (the max
    pass)."""

    def __init__(self, problem: Problem, tiles: BlockMask | None = None, nearest_first: bool = False,
                 raw: bool = False):
        self.p, self.nearest_first = problem, nearest_first  # last key tile first: the max pass
        self.active = None if tiles is None else tiles.tiles
        self.qh = _head_major_queries(problem.q, problem.heads_kv)
        self.rows = torch.arange(problem.seqlen_q, device=problem.vis.q_limit.device)[:, None]  # for ``vis.pairs``
        if raw:
            self.shift, self.scale = 0.0, 1.0
        else:
            shift = torch.zeros(problem.rows) if problem.shift is None else problem.shift
            self.shift = shift.to(device=self.qh.device, dtype=self.qh.dtype)[..., None]
            self.scale = problem.scale_z_at(self.shift)  # per head: (H, 1, 1)

    def rows_of_tiles(self, per_tile: torch.Tensor) -> torch.Tensor:
        """(..., nQ) -> (..., Sq): every row takes its query tile's value."""
        return per_tile.repeat_interleave(self.p.block_m, dim=-1)[..., : self.p.seqlen_q]

    def tile_keys(self, index: int) -> slice:
        return slice(index * self.p.block_n, min((index + 1) * self.p.block_n, self.p.seqlen_k))

    def __iter__(self):
        """Yields (tile index, key slice, z (B, Hq, Sq, n)) for tiles with any active pair."""
        p, vis = self.p, self.p.vis
        order = range(p.num_k_tiles)
        for index in reversed(order) if self.nearest_first else order:
            keys = self.tile_keys(index)
            allowed = vis.pairs(self.rows, torch.arange(keys.start, keys.stop, device=self.rows.device)[None, :])
            allowed = allowed[None, None]
            if self.active is not None:
                allowed = allowed & self.rows_of_tiles(self.active[..., index])[..., None]
            if not bool(allowed.any()):
                continue
            kt = p.k[:, keys].to(self.qh.dtype).permute(0, 2, 3, 1)[:, :, None]  # (B, Hkv, 1, D, n)
            z = ((self.qh @ kt).reshape(p.batch, p.heads, p.seqlen_q, -1) - self.shift) * self.scale
            yield index, keys, z.masked_fill(~allowed, float("-inf"))

    def per_query_tile(self, rows: torch.Tensor, reduce: str) -> torch.Tensor:
        """(B, H, Sq) -> (B, H, nQ) by max or any over each query tile."""
        return stats.per_query_tile(rows, self.p.block_m, reduce)


def nearest_tau_floor(problem: Problem) -> torch.Tensor:
    """``Maxima.tau_floor`` (B, Hq, Sq), a raw score: per row, a lower bound of tau from its
    visible keys in the last two key tiles of its query tile's span (``visibility.key_tile_span``;
    on a causal diagonal, the nearest keys, where most of a row's mass usually sits).
    ``FLOOR_STEPS`` Newton steps on ``f(t) = sum (z - t)_+^gamma = 1``, z relative to the largest
    of those scores, from ``-1``: f is convex and decreasing, so from below every step lands below
    their tau, and closer. Back in raw units it is lowered by two ulps of that score: the rounding
    of the conversion."""
    p, vis = problem, problem.vis
    block_m, block_n, device = p.block_m, p.block_n, p.q.device
    lo, hi = (t.to(device) for t in key_tile_span(vis, block_m, block_n))
    offs = torch.arange(2 * block_n, device=device)
    keys = (hi - 2)[:, None] * block_n + offs  # (nQ, 2 block_n)
    valid = (keys >= lo[:, None] * block_n) & (keys < hi[:, None] * block_n) & (keys < p.seqlen_k)
    keys = torch.where(valid, keys, 0)
    rows = torch.arange(p.num_q_tiles * block_m, device=device).clamp(max=p.seqlen_q - 1).view(-1, block_m)
    pair = vis.pairs(rows[:, :, None], keys[:, None, :]) & valid[:, None, :]  # (nQ, bm, 2bn)
    qh = _head_major_queries(p.q, p.heads_kv)  # (B, Hkv, G, Sq, D)
    qt = qh[..., rows.flatten(), :].unflatten(-2, (p.num_q_tiles, block_m))  # (B, Hkv, G, nQ, bm, D)
    kt = p.k.to(qh.dtype).permute(0, 2, 1, 3)[:, :, keys]  # (B, Hkv, nQ, 2bn, D)
    scores = qt @ kt[:, :, None].transpose(-1, -2)  # (B, Hkv, G, nQ, bm, 2bn)
    scores = scores.masked_fill(~pair, float("-inf")).reshape(p.batch, p.heads, p.num_q_tiles * block_m, 2 * block_n)
    scores = scores[:, :, :p.seqlen_q]
    top = scores.amax(-1)
    has = torch.isfinite(top)
    z = (scores - torch.where(has, top, torch.zeros_like(top))[..., None]) * p.scale_z_at(scores)
    t = torch.full_like(top, -1.0)
    gamma = p.spec.gamma_at(t)
    for _ in range(stats.FLOOR_STEPS):
        f, slope = p.spec.power_and_slope((z - t[..., None]).clamp(min=0))
        t = t + (f.sum(-1) - 1.0) / (gamma * slope.sum(-1)).clamp(min=1e-30)
    ulps = 2 * torch.finfo(top.dtype).eps * top.abs()
    floor = top + (t - stats.FLOOR_MARGIN) / p.scale_z_at(t) - ulps
    return torch.where(has, floor, torch.full_like(t, float("-inf")))


def relative(score_max, tau_floor, spec: EntmaxSpec, softmax_scale: float) -> stats.Relative:
    """``stats.relative`` with ``spec``'s scale of z."""
    return stats.relative(score_max, tau_floor, spec.scale_z_at(softmax_scale, score_max))


def lower_bound_mask(gap_codes, lower, reference, empty, within=None) -> torch.Tensor:
    """``stats.lower_bound_mask`` with query tiles of ``BLOCK_M`` rows."""
    return stats.lower_bound_mask(gap_codes, lower, reference, empty, BLOCK_M, within)


def max_pass(problem: Problem, score_max=None, tau_floor=None) -> Maxima:
    """The dense pass over this key block's raw scores, last key tile first (see
    ``backend.Maxima``): the running score max, starting from ``score_max`` (the max over earlier
    key blocks) when given; the tau floor (``nearest_tau_floor`` of this block unless given, as it
    is for every block after the first); and the tile gaps, in z, against ``stats.gap_reference``
    of the two (both relative to the running max, so the gaps are exact differences).

    ``gap_reference`` never exceeds its final value, so a gap bounds from above how far any key of
    the tile rises over it: the tile tests of the later passes rest on this. Taken nearest first
    (causal: the diagonal, where a row's max usually is), the running max is close to the final
    one early and the gaps of far tiles are tight. A row that sees a NaN score keeps a NaN
    running max, stored as +inf (``backend.Maxima``)."""
    tiles = _KeyTiles(problem, nearest_first=True, raw=True)
    device, dtype = problem.q.device, _compute_dtype(problem.q)
    if score_max is None:
        running = torch.full(problem.rows, float("-inf"), device=device, dtype=dtype)
    else:
        running = score_max.to(device=device, dtype=dtype, copy=True)
    if tau_floor is None:
        tau_floor = nearest_tau_floor(problem)
    tau_floor = tau_floor.to(device=device, dtype=dtype)
    scale_z = problem.scale_z_at(running)
    tile_gap = torch.full(problem.tiles, float("-inf"), device=device)
    for index, _, scores in tiles:
        row_tile_max = scores.amax(-1)  # NaN where the row sees a NaN score
        running = torch.maximum(running, row_tile_max)
        reference = stats.gap_reference(torch.zeros_like(running), scale_z * (tau_floor - running))
        gap = scale_z * (row_tile_max - running) - reference
        gap = torch.where(torch.isfinite(row_tile_max) & torch.isfinite(running), gap, float("-inf"))
        tile_gap[..., index] = tiles.per_query_tile(gap, "max")
    running = torch.where(torch.isnan(running), float("inf"), running)
    return Maxima(running, tau_floor, stats.encode_gaps(tile_gap))


def histogram_pass(problem: Problem, row_max, tau_floor, gap_codes, tiles: BlockMask):
    """Coarse histogram of this key block against the reference ``K = bin_reference(row_max)``.

    ``row_max`` (B, Hq, Sq) is the max over every key block (so histograms of all blocks share one
    reference and add exactly); ``tiles`` = ``stats.histogram_mask(gap_codes)``: only those tiles
    are read. Returns ``hist`` (B, Hq, Sq, NB): the number of keys in local bin
    ``K - floor(z (NB - 1)) < stats.kept_bins(row_max, tau_floor)`` (no bin below the bin of the
    floor), and the tile gaps' codes (``stats.encode_gaps``) with ``GAP_ZERO`` on the visible
    tiles where no row has a key in its own kept bins (all of them outside ``tiles``).
    """
    nb = stats.NUM_BINS
    key_tiles = _KeyTiles(problem, tiles)
    hist = torch.zeros(*problem.rows, nb, device=problem.q.device)
    near = torch.zeros_like(tiles.tiles)
    ref = stats.bin_reference(row_max)
    bins = stats.kept_bins(row_max, tau_floor)
    for index, _, z in key_tiles:
        idx = torch.floor(z * (nb - 1))
        local = (ref[..., None] - idx).clamp(min=0)  # a logit equal to its row max is in bin 0
        keep = torch.isfinite(z) & (local < bins[..., None])
        near[..., index] = key_tiles.per_query_tile(keep.any(-1), "any")
        slot = torch.where(keep, local, torch.zeros_like(local)).to(torch.int64)  # NaN is no index
        hist.scatter_add_(-1, slot, keep.float())
    return hist, gap_codes.masked_fill(~near & (gap_codes != stats.GAP_NONE), stats.GAP_ZERO)


def _add_pair_moments(out, x, near):
    """Adds count, sum v, sum v^2 per sub-bin of the pair (``0 <= x < 2``, v the position inside
    the sub-bin) and count, sum y, sum y^2 of the keys above it (``y = x - 2``) to ``out``."""
    nf = stats.FINE_BINS
    in_pair = near & (x >= 0) & (x < 2)
    frac = torch.where(in_pair, x * (nf // 2), torch.zeros_like(x))
    sub = torch.floor(frac).clamp(0, nf - 1)
    v = frac - sub
    where = sub.to(torch.int64)
    for moment, value in enumerate((in_pair.to(x.dtype), v, v * v)):
        out[..., moment, :nf].scatter_add_(-1, where, torch.where(in_pair, value, torch.zeros_like(value)))
    above = x >= 2
    y = torch.where(above, x - 2, torch.zeros_like(x))
    for moment, value in enumerate((above.to(x.dtype), y, y * y)):
        out[..., moment, nf] += value.sum(-1)


def fine_histogram_pass(problem: Problem, tiles: BlockMask, bin_index, cutoff=None):
    """Exact sums near tau over ``tiles`` (alpha 1.5 and 2), with ``bin_index`` (B, H, Sq) the
    lower of the two coarse bins that hold tau: the sums (B, H, Sq, 3, FINE_BINS + 1) of
    ``stats.fine_tau`` (per sub-bin of the pair count, sum v, sum v^2 of its keys at or above
    ``cutoff``, a lower bound of tau (B, H, Sq; none when not given); in the last column count,
    sum y, sum y^2 of the keys above the pair), and ``keep`` (B, H, nQ, nK) bool: tiles where some
    row has a key at or above ``cutoff`` and no lower than one bin below the pair. tau lies
    inside the pair and above ``cutoff``, so the output needs no other tile: a mask tested per
    row, tighter than the per-tile bound that chose ``tiles``. Keys below ``cutoff`` have p = 0;
    leaving them out only lowers the sums at sub-bin edges below tau, which stay above 1
    (``stats.fine_tau`` looks for the last edge there). Returns ``(sums, keep)``."""
    key_tiles = _KeyTiles(problem, tiles)
    nb = stats.NUM_BINS
    dtype = _compute_dtype(problem.q)
    out = torch.zeros(*problem.rows, 3, stats.FINE_BINS + 1, device=problem.q.device, dtype=dtype)
    target = bin_index.to(dtype)[..., None]
    keep = torch.zeros_like(tiles.tiles)
    if cutoff is None:
        low_x = torch.full_like(target, -1.0)
    else:
        low_x = (cutoff.to(dtype)[..., None] * (nb - 1) - target).clamp(min=-1)
    for index, _, z in key_tiles:
        x = z * (nb - 1) - target  # coarse bins above the lower edge of the pair
        near = x >= low_x
        keep[..., index] = key_tiles.per_query_tile(near.any(-1), "any") & tiles.tiles[..., index]
        _add_pair_moments(out, x, near)
    return out, keep


def fine_tau(bracket: stats.Bracket, fine: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``stats.fine_tau`` and the rows where it is exact (``stats.two_point_exact``)."""
    tau = stats.fine_tau(bracket, fine, spec)
    return tau, stats.two_point_exact(bracket, fine, tau)


def newton_sums_pass(problem: Problem, tiles: BlockMask, point, rows=None):
    """(B, H, Sq, 2) float64 ``sum (z - t)_+^gamma, sum (z - t)_+^(gamma - 1)`` at ``t = point``
    (B, H, Sq) over ``tiles``; with ``rows`` (B, H, Sq) bool, only on the query tiles holding a
    marked row (zeros elsewhere): the first two sums of ``newton_moments_pass``."""
    return newton_moments_pass(problem, tiles, point, rows)[0][..., :2]


def newton_moments_pass(problem: Problem, tiles: BlockMask, point, rows=None, keep: bool = False,
                        closest: bool = False, below: bool = False):
    """The Newton schedule's pass at ``t = point`` over ``tiles`` (only the query tiles holding a
    row of ``rows``, when given): ``sums`` (B, H, Sq, 3) float64, ``sum (z - t)_+^gamma``,
    ``sum (z - t)_+^(gamma - 1)`` and the count of keys above t, with ``closest`` and a fourth
    column: the smallest gap ``z - t > 0``, +inf where none (``stats.newton_step``'s exact stop; a
    minimum, which key blocks do not add up), or with ``below`` the smallest ``t - z >= 0`` (the
    largest key at or below t: ``stats.newton_step``'s exact stop from above); with ``keep``,
    also (B, H, nQ, nK) bool, the tiles
    read that hold a key above ``t - MASK_MARGIN`` (no other tile read holds p > 0 for a tau >=
    t), else None."""
    if rows is not None:
        tiles = tiles.with_tiles(tiles.tiles & stats.per_query_tile(rows, problem.block_m, "any")[..., None])
    sums = torch.zeros(*problem.rows, 3, device=problem.q.device, dtype=torch.float64)
    nearest = torch.full(problem.rows, float("inf"), device=problem.q.device, dtype=torch.float64) if closest \
        else None
    near = torch.zeros(problem.tiles, device=problem.q.device, dtype=torch.bool) if keep else None
    t = point.double()[..., None]
    key_tiles = _KeyTiles(problem, tiles)
    for index, _, z in key_tiles:
        z = z.double()
        gap = _gap(z, t)
        p, u = problem.spec.weights(gap)
        sums += torch.stack((p.sum(-1), u.sum(-1), (gap > 0).sum(-1).double()), -1)
        if closest and below:
            nearest = torch.minimum(nearest, torch.where(z <= t, t - z, float("inf")).amin(-1))
        elif closest:
            nearest = torch.minimum(nearest, torch.where(gap > 0, gap, float("inf")).amin(-1))
        if keep:
            near[..., index] = key_tiles.per_query_tile((z > t - stats.MASK_MARGIN).any(-1), "any")
    if closest:
        sums = torch.cat((sums, nearest[..., None]), -1)
    return sums, (near & tiles.tiles) if keep else None


def newton_step(state: stats.NewtonState, sums: torch.Tensor, spec, tolerance: float,
                step_tolerance: float, above: bool = False) -> stats.NewtonState:
    """``stats.newton_step``."""
    return stats.newton_step(state, sums, spec, tolerance, step_tolerance, above)


def newton_polish(problem: Problem, tiles: BlockMask, state: stats.NewtonState, steps: int) -> torch.Tensor:
    """``steps`` Newton steps with no stopping rule (``newton_sums_pass`` over ``tiles`` on the
    query tiles holding a row not done, then ``newton_step``) for a query block that holds all its
    keys, step for step as ``triton_newton.newton_polish_kernel`` runs them in one launch: the
    exact finish after the closed form. Returns the last point (B, H, Sq) float64."""
    rows = ~state.done
    for _ in range(steps):
        state = newton_step(state, newton_sums_pass(problem, tiles, state.point, rows), problem.spec, stats.NO_STOP,
                            stats.NO_STOP)
    return state.point


def column_floor(problem: Problem, tiles: BlockMask, reference, row_max):
    """The Newton schedule's start (B, H, Sq), in ``reference``'s dtype: on the rows with a
    finite ``row_max``, the larger of ``reference`` and ``stats.column_tau`` of the row's column
    maxima over ``tiles`` (per key position of a tile, the largest z); ``reference`` elsewhere.
    One sweep of max only, no sums: on flat rows it starts the steps where two or three of
    them would have led (docs/design.md, the Newton schedule)."""
    key_tiles = _KeyTiles(problem, tiles)
    columns = torch.full((*problem.rows, problem.block_n), float("-inf"), device=problem.q.device,
                         dtype=key_tiles.qh.dtype)  # z's
    for _, _, z in key_tiles:
        columns[..., : z.shape[-1]] = torch.maximum(columns[..., : z.shape[-1]], z)
    floor = stats.column_tau(columns, problem.spec).to(reference.dtype)
    return torch.where(torch.isfinite(row_max) & (floor > reference), floor, reference)


def newton_schedule(problem: Problem, tiles: BlockMask, reference, row_max, tolerance: float, step_tolerance: float,
                    output: OutputRequest | None = None):
    """The Newton schedule of a query block that holds all its keys (``algorithm``'s, for one key
    block and nothing to merge), step for step as ``triton_newton.newton_schedule_kernel`` runs it:
    from ``stats.NewtonState.start(reference, row_max)``, ``newton_moments_pass`` over ``tiles`` and
    ``newton_step`` on the query tiles with a row not done, up to ``NEWTON_SCHEDULE_STEPS``; from
    step ``NEWTON_NARROW_STEP`` on, each pass marks the tiles that may hold p > 0 and takes the
    rows' smallest gaps (the exact stop); at alpha 1.5 step ``NEWTON_UPPER_STEP``'s pass is at the
    upper bound the step before gave, where it gave one, and takes the largest keys at or below the
    points (the exact stop from above). Returns tau
    (B, H, Sq) float64 (the last point; the start on rows with no visible key) and (B, H, nQ, nK)
    bool, the tiles of ``tiles`` the last marking pass of their query tile kept (all of them where
    none marked), and None: the output is left to ``output_pass`` (``output`` is not read)."""
    state = stats.NewtonState.start(column_floor(problem, tiles, reference, row_max), row_max)
    kept = tiles.tiles
    closed = problem.spec.power == 2  # alpha 1.5: the upper bound and the exact stops
    for step in range(stats.NEWTON_SCHEDULE_STEPS):
        rows = ~state.done
        if not rows.any():
            break
        mark = step >= stats.NEWTON_NARROW_STEP
        above = closed and step == stats.NEWTON_UPPER_STEP
        sums, near = newton_moments_pass(problem, tiles, state.point, rows, keep=mark, closest=mark or above,
                                         below=above)
        if mark:
            kept = torch.where(stats.per_query_tile(rows, problem.block_m, "any")[..., None], near, kept)
        upper = state.upper
        state = newton_step(state, sums, problem.spec, tolerance, step_tolerance, above)
        if closed and step + 1 == stats.NEWTON_UPPER_STEP:
            # the next sweep at the upper bound this one gave, where it gave one
            moved = ~state.done & (state.upper < upper)
            state = state._replace(point=torch.where(moved, state.upper, state.point))
    return state.point, kept, None


def _gap(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``(z - tau)_+``, 0 where either is NaN (a row with a NaN tau is marked NaN as a whole)."""
    return torch.where(z > tau, z - tau, torch.zeros_like(z))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros in place of NaN and inf."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _nan_rows(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``x`` (B, Sq, Hq, D) with NaN on the rows whose tau (B, Hq, Sq) is NaN."""
    return torch.where(torch.isnan(tau).transpose(1, 2)[..., None], float("nan"), x)


def output_pass(problem: Problem, tau, tiles: BlockMask, backward_sums: bool = True, out_dtype=None,
                partial: PartialOutput | None = None) -> OutputSums:
    """Partial output for a known tau over ``tiles`` (``backend.OutputSums``; ``out_u`` and
    ``u_sum`` only with ``backward_sums``; ``out`` and ``out_u`` in ``out_dtype`` where given); additive across
    key blocks. Rows whose tau is NaN come out NaN. ``partial``: none is ever made here
    (``newton_schedule``)."""
    if partial is not None:
        raise ValueError("the PyTorch backend makes no partial output")
    key_tiles = _KeyTiles(problem, tiles)
    p = problem
    dtype = key_tiles.qh.dtype
    out = torch.zeros(p.batch, p.heads_kv, p.group, p.seqlen_q, p.v.shape[-1], device=p.q.device, dtype=dtype)
    support = torch.zeros(p.rows, device=p.q.device, dtype=dtype)
    out_u, u_sum = (torch.zeros_like(out), torch.zeros_like(support)) if backward_sums else (None, None)
    nonzero = torch.zeros(p.tiles, dtype=torch.bool, device=p.q.device)
    tau_col = tau.to(dtype)[..., None]
    by_group = (p.batch, p.heads_kv, p.group, p.seqlen_q, -1)
    for index, keys, z in key_tiles:
        gap = _gap(z, tau_col)
        prob, u = p.spec.weights(gap)
        vt = p.v[:, keys].to(dtype).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, n, D)
        out += prob.reshape(by_group) @ vt
        if backward_sums:
            out_u += u.reshape(by_group) @ vt
            u_sum += u.sum(-1)
        support += (gap > 0).sum(-1)
        nonzero[..., index] = key_tiles.per_query_tile((gap > 0).any(-1), "any")
    to_public = lambda x: x.reshape(p.batch, p.heads, p.seqlen_q, -1).permute(0, 2, 1, 3)  # noqa: E731
    out_u = to_public(out_u) if backward_sums else None
    out = _nan_rows(to_public(out), tau)
    if out_dtype is not None:
        out, out_u = out.to(out_dtype), None if out_u is None else out_u.to(out_dtype)
    return OutputSums(out, out_u, u_sum, support, nonzero)


def row_delta(grad_out, out_u, u_sum):
    """delta (B, Hq, Sq) = (dO . sum u v) / sum u, the per-row term of the entmax Jacobian, from
    ``grad_out`` and ``out_u`` (B, Sq, Hq, D) and ``u_sum`` (B, Hq, Sq); 0 where sum u = 0."""
    dtype = torch.promote_types(out_u.dtype, torch.float32)  # a 16-bit out_u is summed in float32
    dot = (grad_out.to(dtype) * out_u.to(dtype)).sum(-1).transpose(1, 2)
    return torch.where(u_sum > 0, dot / u_sum.clamp(min=1e-30), torch.zeros_like(dot))


def backward_pass(problem: Problem, grad_out, tau, tiles: BlockMask, delta=None, out_u=None, u_sum=None,
                  kv_grad_dtype=None, alpha_sums: bool = False, q_grad_dtype=None,
                  alpha_split: AlphaSplit | None = None) -> Gradients:
    """Gradients through the ``tiles`` of one key block (``backend.Gradients``; float32, float64
    for float64 inputs, dk and dv in ``kv_grad_dtype`` and dq in ``q_grad_dtype`` where given); dq
    is NaN on rows whose tau is NaN, dk and dv on the keys such a row sees (``keys_seen_by``).

    ``delta`` (B, Hq, Sq) = (grad_out . out_u) / u_sum, from the merged forward row terms; None:
    computed here from ``out_u`` and ``u_sum`` (``row_delta``). With ``g = grad_out . v`` the
    score gradient is ``ds = u (g - delta)``; ``dq = scale ds k``, ``dk = scale ds^T q``,
    ``dv = p^T grad_out`` (dk, dv summed over each GQA group). Non-finite inputs reach only the
    rows and keys that see them: the products read them as zeros (a zero weight times NaN would
    spread NaN over the whole tile). ``alpha_sums``: also ``Gradients.alpha_sums``, term by term
    (``alpha_split`` is not read: this backend's forward computes none).
    """
    if delta is None:
        delta = row_delta(grad_out, out_u, u_sum)
    key_tiles = _KeyTiles(problem, tiles)
    p = problem
    dtype, qh = key_tiles.qh.dtype, _finite(key_tiles.qh)
    do_h = _head_major_queries(grad_out, p.heads_kv).to(dtype)  # (B, Hkv, G, Sq, D)
    dq = torch.zeros_like(qh)
    dk = torch.zeros(p.k.shape, device=p.k.device, dtype=dtype)
    dv = torch.zeros(p.v.shape, device=p.v.device, dtype=dtype)
    tau_col = tau.to(dtype)[..., None]
    by_group = (p.batch, p.heads_kv, p.group, p.seqlen_q, -1)
    delta_col = delta.to(dtype).reshape(*by_group[:-1], 1)
    sums = torch.zeros(*by_group[:-1], device=p.q.device, dtype=dtype) if alpha_sums else None
    for _, keys, z in key_tiles:
        gap = _gap(z, tau_col)
        prob, u = p.spec.weights(gap)
        prob, u = prob.reshape(by_group), u.reshape(by_group)
        kt = _finite(p.k[:, keys].to(dtype).permute(0, 2, 1, 3)[:, :, None])  # (B, Hkv, 1, n, D)
        vt = p.v[:, keys].to(dtype).permute(0, 2, 1, 3)[:, :, None]
        g = do_h @ vt.transpose(-1, -2)  # (B, Hkv, G, Sq, n)
        ds = torch.where(u > 0, u * (g - delta_col), 0.0)
        if alpha_sums:
            sums += p.spec.alpha_terms(gap.reshape(by_group), prob, g - delta_col).sum(-1)
        dq += p.softmax_scale * (ds @ kt)
        dk[:, keys] += p.softmax_scale * (ds.transpose(-1, -2) @ qh).sum(2).permute(0, 2, 1, 3)
        dv[:, keys] += (prob.transpose(-1, -2) @ do_h).sum(2).permute(0, 2, 1, 3)
    dq = _nan_rows(dq.reshape(p.batch, p.heads, p.seqlen_q, -1).permute(0, 2, 1, 3), tau)
    nan_keys = keys_seen_by(torch.isnan(tau), p.vis, p.heads_kv)
    dk, dv = (x.masked_fill(nan_keys[..., None], float("nan")) for x in (dk, dv))
    if alpha_sums:
        sums = torch.where(torch.isnan(tau), float("nan"), sums.reshape(p.rows))
    return Gradients(dq.to(q_grad_dtype or dtype), dk.to(kv_grad_dtype or dtype), dv.to(kv_grad_dtype or dtype),
                     delta, sums)
