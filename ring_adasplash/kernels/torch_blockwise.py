"""The blockwise algorithm in plain PyTorch: the CPU backend, and the spec the Triton kernels follow.

Each pass walks the key block one tile of ``block_n`` keys at a time with every query at once, so
memory is O(Sq * block_n), never O(Sq * Sk). Tensors come in the public layout
(batch, seqlen, heads, head_dim); statistics are head-major (batch, heads, seqlen, ...).
Logits ``z = (alpha - 1) * softmax_scale * q . k``; see ``stats.py`` for the statistics.
"""
from __future__ import annotations

import torch

from . import stats as S
from .stats import ZERO_TILE
from .visibility import Visibility, key_tile_span

BLOCK_M = 64  # query rows per tile of the block mask
BLOCK_N = 64  # keys per tile
SUPPORTED_HEAD_DIMS = None  # any head dim
coarse_bracket = S.coarse_bracket  # tau from the statistics: the backend-neutral float64 math
fine_tau = S.fine_tau


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_major_queries(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, Sq, Hq, D) -> (B, Hkv, G, Sq, D) so one key head serves its G query heads (GQA)."""
    batch, seqlen, heads, dim = q.shape
    return q.to(_compute_dtype(q)).permute(0, 2, 1, 3).reshape(batch, heads_kv, heads // heads_kv, seqlen, dim)


class _KeyTiles:
    """Logits of all queries against one key tile at a time, with invisible and inactive pairs at -inf."""

    def __init__(self, q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, active=None,
                 nearest_first: bool = False):
        self.nearest_first = nearest_first  # last key tile first (the max pass: see ``max_pass``)
        self.batch, self.seqlen_q, self.heads, _ = q.shape
        self.heads_kv = k.shape[2]
        self.qh = _head_major_queries(q, self.heads_kv)
        self.k, self.vis, self.scale_z = k, vis, scale_z
        self.block_m, self.block_n, self.active = block_m, block_n, active
        self.num_tiles = -(-k.shape[1] // block_n)

    def rows_of_tiles(self, per_tile: torch.Tensor) -> torch.Tensor:
        """(..., nQ) -> (..., Sq): every row takes its query tile's value."""
        return per_tile.repeat_interleave(self.block_m, dim=-1)[..., : self.seqlen_q]

    def tile_keys(self, index: int) -> slice:
        return slice(index * self.block_n, min((index + 1) * self.block_n, self.k.shape[1]))

    def __iter__(self):
        """Yields (tile index, key slice, z (B, Hq, Sq, n)) for tiles with any active pair."""
        vis = self.vis
        order = range(self.num_tiles)
        for index in reversed(order) if self.nearest_first else order:
            keys = self.tile_keys(index)
            allowed = (vis.k_pos[None, keys] <= vis.q_limit[:, None]) & (vis.q_doc[:, None] == vis.k_doc[None, keys])
            allowed = allowed[None, None]
            if self.active is not None:
                allowed = allowed & self.rows_of_tiles(self.active[..., index])[..., None]
            if not bool(allowed.any()):
                continue
            kt = self.k[:, keys].to(self.qh.dtype).permute(0, 2, 3, 1)[:, :, None]  # (B, Hkv, 1, D, n)
            z = (self.qh @ kt).reshape(self.batch, self.heads, self.seqlen_q, -1) * self.scale_z
            yield index, keys, z.masked_fill(~allowed, float("-inf"))

    def per_query_tile(self, rows: torch.Tensor, reduce: str) -> torch.Tensor:
        """(B, H, Sq) -> (B, H, nQ) by max or any over each query tile."""
        return S.per_query_tile(rows, self.block_m, reduce)


def _power_and_slope(d: torch.Tensor, gamma: float):
    """(d ** gamma, d ** (gamma - 1)) for d >= 0, as the kernels take them."""
    if gamma == 1.0:
        return d, (d > 0).to(d.dtype)
    if gamma == 2.0:
        return d * d, d
    slope = torch.where(d > 0, d.pow(gamma - 1.0), torch.zeros_like(d))
    return d * slope, slope


def nearest_tau_floor(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, alpha: float):
    """``Maxima.tau_floor`` (B, Hq, Sq): per row, a lower bound of tau from its visible keys in
    the last two key tiles of its query tile's span (``visibility.key_tile_span``; on a causal
    diagonal, the nearest keys, where most of a row's mass usually sits). ``FLOOR_STEPS`` Newton
    steps on ``f(t) = sum (z - t)_+^gamma = 1`` from ``max - 1`` of those keys: f is convex and
    decreasing, so from below every step lands below their tau, and closer."""
    batch, seqlen_q, heads, dim = q.shape
    heads_kv, seqlen_k = k.shape[2], k.shape[1]
    gamma = 1.0 / (alpha - 1.0)
    lo, hi = (t.to(q.device) for t in key_tile_span(vis, block_m, block_n))
    num_q_tiles = lo.shape[0]
    offs = torch.arange(2 * block_n, device=q.device)
    keys = (hi - 2)[:, None] * block_n + offs  # (nQ, 2 block_n)
    valid = (keys >= lo[:, None] * block_n) & (keys < hi[:, None] * block_n) & (keys < seqlen_k)
    keys = torch.where(valid, keys, 0)
    rows = torch.arange(num_q_tiles * block_m, device=q.device).clamp(max=seqlen_q - 1).view(num_q_tiles, block_m)
    pair = (vis.k_pos[keys][:, None, :] <= vis.q_limit[rows][:, :, None]) & (
        vis.q_doc[rows][:, :, None] == vis.k_doc[keys][:, None, :]) & valid[:, None, :]  # (nQ, bm, 2bn)
    qh = _head_major_queries(q, heads_kv)  # (B, Hkv, G, Sq, D)
    qt = qh[..., rows.flatten(), :].unflatten(-2, (num_q_tiles, block_m))  # (B, Hkv, G, nQ, bm, D)
    kt = k.to(qh.dtype).permute(0, 2, 1, 3)[:, :, keys]  # (B, Hkv, nQ, 2bn, D)
    z = (qt @ kt[:, :, None].transpose(-1, -2)) * scale_z  # (B, Hkv, G, nQ, bm, 2bn)
    z = z.masked_fill(~pair, float("-inf")).reshape(batch, heads, num_q_tiles * block_m, 2 * block_n)
    z = z[:, :, :seqlen_q]
    top = z.amax(-1)
    has = torch.isfinite(top)
    t = torch.where(has, top, torch.zeros_like(top)) - 1.0
    for _ in range(S.FLOOR_STEPS):
        f, slope = _power_and_slope((z - t[..., None]).clamp(min=0), gamma)
        t = t + (f.sum(-1) - 1.0) / (gamma * slope.sum(-1)).clamp(min=1e-30)
    return torch.where(has, t - S.FLOOR_MARGIN, torch.full_like(t, float("-inf"))).float()


def max_pass(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, alpha: float | None, row_max=None,
             tau_floor=None) -> S.Maxima:
    """The dense pass over this key block, last key tile first (see ``stats.Maxima``): the running
    row max, starting from ``row_max`` (the max over earlier key blocks) when given; the tau floor
    (``nearest_tau_floor`` of this block unless given, as it is for every block after the first;
    none, -inf, when ``alpha`` is None); and the tile gaps against ``stats.tau_low`` of the two.

    ``tau_low`` never exceeds its final value, so a gap bounds from above how far any key of the
    tile rises over it: the tile tests of the later passes rest on this. Taken nearest first
    (causal: the diagonal, where a row's max usually is), the running max is close to the final
    one early and the gaps of far tiles are tight."""
    tiles = _KeyTiles(q, k, vis, scale_z, block_m, block_n, nearest_first=True)
    batch, heads, seqlen = tiles.batch, tiles.heads, tiles.seqlen_q
    if row_max is None:
        running = torch.full((batch, heads, seqlen), float("-inf"), device=q.device)
    else:
        running = row_max.to(device=q.device, dtype=torch.float32, copy=True)
    if tau_floor is None:
        tau_floor = (torch.full((batch, heads, seqlen), float("-inf"), device=q.device) if alpha is None
                     else nearest_tau_floor(q, k, vis, scale_z, block_m, block_n, alpha))
    tile_gap = torch.full((batch, heads, -(-seqlen // block_m), tiles.num_tiles), float("-inf"), device=q.device)
    for index, _, z in tiles:
        row_tile_max = z.float().amax(-1)
        running = torch.maximum(running, row_tile_max)
        gap = torch.where(torch.isfinite(row_tile_max), row_tile_max - S.tau_low(running, tau_floor), float("-inf"))
        tile_gap[..., index] = tiles.per_query_tile(gap, "max")
    return S.Maxima(running, tau_floor, tile_gap)


def histogram_pass(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, row_max, tile_gap, active,
                   tau_floor=None):
    """Coarse histogram of this key block against the reference ``K = bin_reference(row_max)``.

    ``row_max`` (B, Hq, Sq) is the max over every key block (so histograms of all blocks share one
    reference and add exactly); ``active`` = ``stats.histogram_mask(tile_gap)``:
    only those tiles are read. Returns ``hist`` (B, Hq, Sq, NB): the number of keys in local bin
    ``K - floor(z (NB - 1)) < stats.kept_bins(row_max, tau_floor)`` (NB bins without a floor; with
    one, none below the bin of the floor), and ``tile_gap`` with ``ZERO_TILE`` on the visible tiles
    where no row has a key in its own kept bins (all of them outside ``active``).
    """
    nb = S.NUM_BINS
    tiles = _KeyTiles(q, k, vis, scale_z, block_m, block_n, active)
    batch, heads, seqlen = tiles.batch, tiles.heads, tiles.seqlen_q
    hist = torch.zeros(batch, heads, seqlen, nb, device=q.device)
    near = torch.zeros_like(active)
    ref = S.bin_reference(row_max)
    bins = S.kept_bins(row_max, tau_floor)
    for index, _, z in tiles:
        idx = torch.floor(z.float() * (nb - 1))
        local = (ref[..., None] - idx).clamp(min=0)  # a logit equal to its row max is in bin 0
        keep = torch.isfinite(z) & (local < bins[..., None])
        near[..., index] = tiles.per_query_tile(keep.any(-1), "any")
        hist.scatter_add_(-1, local.clamp(max=nb - 1).to(torch.int64), keep.float())
    return hist, tile_gap.masked_fill(~near & torch.isfinite(tile_gap), ZERO_TILE)


def refine_pass(q, k, vis: Visibility, scale_z: float, block_m: int, block_n: int, active, *,
                bin_index=None, low=None, point=None, alpha=None):
    """Exact sums near tau, over active tiles only.

    With ``bin_index`` (B, H, Sq), the lower of the two coarse bins that hold tau (alpha 1.5 and
    2): the refinement sums (B, H, Sq, 3, FINE_BINS + 1) of ``stats.fine_tau`` (per sub-bin of
    the pair count, sum v, sum v^2 of its keys at or above ``low``, a lower bound of tau (B, H,
    Sq; none when not given); in the last column count, sum y, sum y^2 of the keys above the
    pair), and ``keep`` (B, H, nQ, nK) bool: active tiles where some row has a key at or above
    ``low`` and no lower than one bin below the pair. tau lies inside the pair and above ``low``,
    so the output needs no other tile: a mask tested per row, tighter than the per-tile bound
    that made ``active``. Keys below ``low`` have p = 0; leaving them out only lowers the sums at
    sub-bin edges below tau, which stay above 1 (``stats.fine_tau`` looks for the last edge there).
    With ``point`` (B, H, Sq): Newton sums (B, H, Sq, 2) = ``sum (z - t)_+^gamma,
    sum (z - t)_+^(gamma - 1)`` at ``t = point`` (other alpha), and ``keep = None``.
    Returns ``(sums, keep)``.
    """
    tiles = _KeyTiles(q, k, vis, scale_z, block_m, block_n, active)
    shape = (tiles.batch, tiles.heads, tiles.seqlen_q)
    nb, nf = S.NUM_BINS, S.FINE_BINS
    keep = None
    if bin_index is not None:
        out = torch.zeros(*shape, 3, nf + 1, device=q.device)
        target = bin_index.float()[..., None]
        keep = torch.zeros_like(active)
        low_x = torch.full_like(target, -1.0) if low is None else (low.float()[..., None] * (nb - 1) - target).clamp(min=-1)
    else:
        out = torch.zeros(*shape, 2, device=q.device, dtype=torch.float64)
        gamma = 1.0 / (alpha - 1.0)
        t = point.double()[..., None]
    for index, _, z in tiles:
        if bin_index is not None:
            x = z.float() * (nb - 1) - target  # coarse bins above the lower edge of the pair
            near = x >= low_x
            keep[..., index] = tiles.per_query_tile(near.any(-1), "any") & active[..., index]
            in_pair = near & (x >= 0) & (x < 2)
            frac = torch.where(in_pair, x * (nf // 2), torch.zeros_like(x))
            sub = torch.floor(frac).clamp(0, nf - 1)
            v = frac - sub
            where = sub.to(torch.int64)
            for moment, value in enumerate((in_pair.float(), v, v * v)):
                out[..., moment, :nf].scatter_add_(-1, where, torch.where(in_pair, value, torch.zeros_like(value)))
            above = x >= 2
            y = torch.where(above, x - 2, torch.zeros_like(x))
            for moment, value in enumerate((above.float(), y, y * y)):
                out[..., moment, nf] += value.sum(-1)
        else:
            gap = (z.double() - t).clamp(min=0)
            out[..., 0] += (gap ** gamma).sum(-1)
            out[..., 1] += torch.where(gap > 0, gap ** (gamma - 1), torch.zeros_like(gap)).sum(-1)
    return out, keep


def _weights(gap: torch.Tensor, alpha: float):
    """Probability ``p = gap^gamma`` and backward weight ``u = gap^(gamma - 1)`` (0 off support)."""
    if alpha == 1.5:
        return gap * gap, gap
    if alpha == 2.0:
        return gap, (gap > 0).to(gap.dtype)
    gamma = 1.0 / (alpha - 1.0)
    return gap ** gamma, torch.where(gap > 0, gap ** (gamma - 1), torch.zeros_like(gap))


def output_pass(q, k, v, vis: Visibility, scale_z: float, alpha: float, tau, block_m: int, block_n: int, active):
    """Partial output for a known tau, over active tiles only. Additive across key blocks.

    Returns ``out`` (B, Sq, Hq, D) = sum p v, ``out_u`` (B, Sq, Hq, D) = sum u v, ``u_sum`` (B, Hq, Sq)
    = sum u, ``support`` (B, Hq, Sq) = number of keys with p > 0 (all float32, float64 for float64
    inputs), and ``tile_nonzero`` (B, Hq, nQ, nK) bool: which tiles hold any p > 0.
    """
    tiles = _KeyTiles(q, k, vis, scale_z, block_m, block_n, active)
    batch, heads, seqlen, heads_kv = tiles.batch, tiles.heads, tiles.seqlen_q, tiles.heads_kv
    dim, group = v.shape[-1], heads // heads_kv
    dtype = tiles.qh.dtype
    out = torch.zeros(batch, heads_kv, group, seqlen, dim, device=q.device, dtype=dtype)
    out_u = torch.zeros_like(out)
    u_sum = torch.zeros(batch, heads, seqlen, device=q.device, dtype=dtype)
    support = torch.zeros_like(u_sum)
    nonzero = torch.zeros(batch, heads, -(-seqlen // block_m), tiles.num_tiles, dtype=torch.bool, device=q.device)
    tau_col = tau.to(dtype)[..., None]
    for index, keys, z in tiles:
        gap = (z - tau_col).clamp(min=0)
        p, u = _weights(gap, alpha)
        vt = v[:, keys].to(dtype).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, n, D)
        shape5 = (batch, heads_kv, group, seqlen, -1)
        out += p.reshape(shape5) @ vt
        out_u += u.reshape(shape5) @ vt
        u_sum += u.sum(-1)
        support += (gap > 0).sum(-1)
        nonzero[..., index] = tiles.per_query_tile((gap > 0).any(-1), "any")
    to_public = lambda x: x.reshape(batch, heads, seqlen, dim).permute(0, 2, 1, 3)  # noqa: E731
    return to_public(out), to_public(out_u), u_sum, support, nonzero


def row_delta(grad_out, out_u, u_sum):
    """delta (B, Hq, Sq) = (dO . sum u v) / sum u, the per-row term of the entmax Jacobian, from
    ``grad_out`` and ``out_u`` (B, Sq, Hq, D) and ``u_sum`` (B, Hq, Sq); 0 where sum u = 0."""
    dot = (grad_out.to(out_u.dtype) * out_u).sum(-1).transpose(1, 2)
    return torch.where(u_sum > 0, dot / u_sum.clamp(min=1e-30), torch.zeros_like(dot))


def backward_pass(q, k, v, grad_out, vis: Visibility, scale_z: float, softmax_scale: float, alpha: float,
                  tau, delta, block_m: int, block_n: int, active, kv_grad_dtype=None, out_u=None, u_sum=None):
    """Gradients through one key block, over active tiles only (``kv_grad_dtype``: the dtype of dk
    and dv where they are final, one key block; default the compute dtype).

    ``delta`` (B, Hq, Sq) = (grad_out . out_u) / u_sum, from the merged forward row terms; None:
    computed here from ``out_u`` and ``u_sum`` (``row_delta``).
    With ``g = grad_out . v`` the score gradient is ``ds = u (g - delta)``; ``dq = scale ds k``,
    ``dk = scale ds^T q``, ``dv = p^T grad_out`` (dk, dv summed over each GQA group).
    Returns float32 (float64 for float64 inputs) dq (B, Sq, Hq, D), dk and dv (B, Sk, Hkv, D), and
    delta.
    """
    if delta is None:
        delta = row_delta(grad_out, out_u, u_sum)
    tiles = _KeyTiles(q, k, vis, scale_z, block_m, block_n, active)
    batch, heads, seqlen, heads_kv = tiles.batch, tiles.heads, tiles.seqlen_q, tiles.heads_kv
    dtype = tiles.qh.dtype
    group = heads // heads_kv
    do_h = _head_major_queries(grad_out, heads_kv).to(dtype)  # (B, Hkv, G, Sq, D)
    dq = torch.zeros_like(tiles.qh)
    dk = torch.zeros(k.shape, device=k.device, dtype=dtype)
    dv = torch.zeros(v.shape, device=v.device, dtype=dtype)
    tau_col = tau.to(dtype)[..., None]
    delta_col = delta.to(dtype).reshape(batch, heads_kv, group, seqlen, 1)
    for _, keys, z in tiles:
        gap = (z - tau_col).clamp(min=0)
        p, u = _weights(gap, alpha)
        shape5 = (batch, heads_kv, group, seqlen, -1)
        p, u = p.reshape(shape5), u.reshape(shape5)
        kt = k[:, keys].to(dtype).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, n, D)
        vt = v[:, keys].to(dtype).permute(0, 2, 1, 3)[:, :, None]
        g = do_h @ vt.transpose(-1, -2)  # (B, Hkv, G, Sq, n)
        ds = u * (g - delta_col)
        dq += softmax_scale * (ds @ kt)
        dk[:, keys] += softmax_scale * (ds.transpose(-1, -2) @ tiles.qh).sum(2).permute(0, 2, 1, 3)
        dv[:, keys] += (p.transpose(-1, -2) @ do_h).sum(2).permute(0, 2, 1, 3)
    dq = dq.reshape(batch, heads, seqlen, -1).permute(0, 2, 1, 3)
    return dq, dk.to(kv_grad_dtype or dtype), dv.to(kv_grad_dtype or dtype), delta
