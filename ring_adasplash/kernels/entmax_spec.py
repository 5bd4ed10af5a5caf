"""alpha-entmax, made once from alpha: every place that needs alpha reads this object.

``p_j = [z_j - tau]_+ ** gamma`` with ``gamma = 1 / (alpha - 1)`` and ``z = (alpha - 1) * scale * q.k``;
the backward weight is ``u_j = p_j ** (2 - alpha) = [z_j - tau]_+ ** (gamma - 1)``.

The gradient with respect to alpha at fixed scores ``s = scale * q.k`` (Peters, Niculae and
Martins, 2019; ``entmax_bisect``'s backward), per row, with ``g_j = dO . v_j`` the gradient
with respect to ``p_j`` and ``delta = sum_j g_j u_j / sum_j u_j`` the backward's row term:

    dL/dalpha = (sum g p - delta) / (alpha - 1)^2 - (sum g p log p - delta sum p log p) / (alpha - 1)

Since ``sum p = 1`` and ``log p = gamma log gap``, that is one sum over the support:

    dL/dalpha = gamma^2 sum_j (g_j - delta) p_j (1 - log gap_j)

One sum where the formula has three: the kernels reduce one row sum per tile instead of three, and
``g - delta`` is the factor of the score gradient ``ds = u (g - delta)`` they form anyway
(``(g - delta) p = ds gap``). It is also unchanged when a constant is added to ``g`` (as the exact
gradient is, with ``sum p = 1`` for every alpha), where the three-sum form carries ``delta (sum p - 1)``
of rounding. It adds across key blocks, so it costs no O(S^2) tensor: ``alpha_gradient`` takes it
(``Gradients.alpha_sums``).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from .identity import remembered_in

CLOSED_FORM_ALPHAS = (1.5, 2.0)  # tau from the histograms in closed form (gamma 2 and 1)

# ``EntmaxSpec.power`` of the general form, by the log2 its powers take (``triton_common.power_log2``).
# Chosen where the kernels are compiled, not in their tile loops: a branch on a value there keeps
# both logs' code live in every loop, and the dQ and output loops spill registers on every trip.
POWER_GENERAL = 0  # every gamma <= APPROX_LOG_MAX_GAMMA: the GPU's approximate log2
POWER_GENERAL_EXACT_LOG = -1  # every gamma above it: a correctly rounded log2
POWER_BY_HEAD = -2  # heads on both sides, or alphas on the device alone: chosen per head
# The largest gamma (alpha >= 1.2) whose powers take log2 from the approximate instruction: its
# error, about 2^-22 in the log, becomes gamma ln 2 2^-22 relative error in the power, under 1e-6
# here (8.3e-7), far below the 1e-5 the rows' sums are held to; gamma near 100 (alpha near 1) would
# multiply it up to that.
APPROX_LOG_MAX_GAMMA = 5.0
NO_VALUES = "alpha: expected one value or one per query head, or a table of them; got none"

# Per-head constants on the device, made once per values, dtype and device: a copy from the host
# that a CUDA graph's capture forbids. A captured graph reads them by address, so it holds
# ``remembered()`` as the launchers' tensors (``triton_backend.remembered``).
_HEAD_CONSTANTS: dict = {}
HEAD_CONSTANTS_CACHE_SIZE = 64


def head_constants(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` (one per head, or none) as a ``dtype`` tensor on ``device``, made once per values,
    dtype and device."""
    return remembered_in(_HEAD_CONSTANTS, (values, dtype, str(device)), HEAD_CONSTANTS_CACHE_SIZE,
                         lambda: torch.tensor(values, dtype=dtype, device=device))


def remembered() -> list:
    """The per-head constants kept between calls."""
    return list(_HEAD_CONSTANTS.values())


def approximate_log(alpha: float) -> bool:
    """Whether the powers of ``alpha``'s gamma take the approximate log2: the test that the kernels
    make on a head's gamma (``triton_common.power_log2``), on the float32 gamma they are given."""
    # (a float64 alpha above 1 is at least 1 + 2^-52 above it, so gamma stays in float32's range)
    gamma_float32, = struct.unpack("f", struct.pack("f", 1.0 / (alpha - 1.0)))
    return gamma_float32 <= APPROX_LOG_MAX_GAMMA


def alpha_form(alpha: float) -> int:
    """The ``POWER`` of one alpha (``EntmaxSpec.power``): 2 or 1 at alpha 1.5 or 2, else the general
    form's by its log2."""
    if alpha in CLOSED_FORM_ALPHAS:
        return {1.5: 2, 2.0: 1}[alpha]
    return POWER_GENERAL if approximate_log(alpha) else POWER_GENERAL_EXACT_LOG


@dataclass(frozen=True)
class EntmaxSpec:
    """alpha-entmax with a fixed alpha in (1, 2] (checked by ``checks.check_alpha`` upstream): one
    float for every head, or a tuple of one per query head (equal values become one float).

    Per-head alphas take the general form's schedule on every head, and in the kernels' loops each
    head's own form (``power``): a head of alpha 1.5 or 2 keeps its closed form's powers there, and
    every head runs in the same launches. Where a per-head value meets a tensor, the tensor is (B,
    H, ...), heads on dim 1 (``gamma_at``).

    ``table``: the same per-head alphas as a float64 tensor (one per head), where the caller has
    them on the device. The per-head constants are then computed from it there, in float64 as on
    the host (the same bits), instead of copied from the host: a forward captured as a CUDA graph
    once then serves every value of an alpha that training moves (``cuda_graphs``). A spec of one
    alpha ignores it. ``alpha`` ``()``: the values are on the device alone (``checks.DeviceAlpha``),
    one per head of ``table``, every head in the general form's schedule (``POWER_BY_HEAD``)."""

    alpha: float | tuple[float, ...]
    table: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # the per-head constants made from ``table``, by name and dtype: one spec serves one call
    _made: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.alpha, (tuple, list)):
            values = tuple(float(a) for a in self.alpha)
            object.__setattr__(self, "alpha", values[0] if len(set(values)) == 1 else values)
        else:
            object.__setattr__(self, "alpha", float(self.alpha))
        if not self.per_head:
            object.__setattr__(self, "table", None)
        elif self.table is not None and self.alpha and tuple(self.table.shape) != (len(self.alpha),):
            raise ValueError(f"table: expected one alpha per head, shape ({len(self.alpha)},); "
                             f"got {tuple(self.table.shape)}")

    @property
    def heads(self) -> int:
        """How many per-head alphas (``per_head`` specs): the values', or the table's."""
        if self.alpha:
            return len(self.alpha)
        if self.table is None:
            raise ValueError(NO_VALUES)
        return self.table.numel()

    @property
    def per_head(self) -> bool:
        """Whether alpha differs between heads (a tuple, one per query head)."""
        return isinstance(self.alpha, tuple)

    @property
    def gamma(self) -> float:
        """The exponent ``1 / (alpha - 1)`` of ``p = [z - tau]_+ ** gamma`` (one alpha only; per
        head: ``gamma_at``)."""
        return 1.0 / (self._one_alpha() - 1.0)

    @property
    def closed_form(self) -> bool:
        """Whether tau comes out of the fine histogram in closed form (alpha 1.5 and 2)."""
        return self.alpha in CLOSED_FORM_ALPHAS

    @cached_property  # read at every launch; a spec's alphas never change
    def power(self) -> int:
        """The kernels' ``POWER`` constant, the form of every head: gamma when it is 1 or 2 (alpha 2
        or 1.5); else the general form, by the log2 its powers take: ``POWER_GENERAL`` where gamma is
        at most ``APPROX_LOG_MAX_GAMMA``, ``POWER_GENERAL_EXACT_LOG`` above it. ``POWER_BY_HEAD``
        where the heads' forms differ or the values are on the device alone: each head then runs
        its own form (``triton_common.runs_form``)."""
        forms = {alpha_form(a) for a in (self.alpha if self.per_head else (self.alpha,))}
        return forms.pop() if len(forms) == 1 else POWER_BY_HEAD

    def scale_z(self, softmax_scale: float) -> float:
        """The factor from ``q . k`` to the entmax logit ``z`` (one alpha only; per head: ``scale_z_at``)."""
        return (self._one_alpha() - 1.0) * softmax_scale

    def gamma_at(self, like: torch.Tensor) -> float | torch.Tensor:
        """gamma as it meets ``like`` (B, H, ...): a float, or per head (H, 1, ...) in its dtype."""
        return self._at("gamma", lambda a: 1.0 / (a - 1.0), like)

    def scale_z_at(self, softmax_scale: float, like: torch.Tensor) -> float | torch.Tensor:
        """``scale_z`` as it meets ``like`` (B, H, ...) (``gamma_at``)."""
        return self._at(("scale_z", softmax_scale), lambda a: (a - 1.0) * softmax_scale, like)

    def kernel_constants(self, softmax_scale: float, device) -> dict:
        """``scale_z`` and ``gamma`` as the Triton kernels take them: floats, or float32 tensors of
        one value per query head, with ``PER_HEAD`` saying which."""
        if not self.per_head:
            return dict(scale_z=self.scale_z(softmax_scale), gamma=self.gamma, PER_HEAD=False)
        scale_z = self._per_head(("scale_z", softmax_scale), lambda a: (a - 1.0) * softmax_scale, torch.float32,
                                 device)
        gamma = self._per_head("gamma", lambda a: 1.0 / (a - 1.0), torch.float32, device)
        return dict(scale_z=scale_z, gamma=gamma, PER_HEAD=True)

    def weights(self, gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability ``p = gap ** gamma`` and backward weight ``u = gap ** (gamma - 1)`` (0 off the
        support) of ``gap = [z - tau]_+`` (B, H, ...)."""
        if self.power == 2:
            return gap * gap, gap
        if self.power == 1:
            return gap, (gap > 0).to(gap.dtype)
        gamma = self.gamma_at(gap)
        return gap ** gamma, torch.where(gap > 0, gap ** (gamma - 1), torch.zeros_like(gap))

    def alpha_terms(self, gap: torch.Tensor, p: torch.Tensor, g_minus_delta: torch.Tensor) -> torch.Tensor:
        """The terms ``(g - delta) p (1 - log gap)`` of the alpha gradient's sum (module doc), 0 off the
        support (where ``g`` may be NaN: a NaN value off the support reaches no sum)."""
        positive = gap > 0
        log_gap = torch.log(torch.where(positive, gap, 1.0))
        return torch.where(positive, g_minus_delta * p * (1.0 - log_gap), 0.0)

    def alpha_gradient(self, alpha_sums: torch.Tensor) -> torch.Tensor:
        """dL/dalpha per row (module doc) from ``alpha_sums`` (B, H, Sq), the row sums of ``alpha_terms``."""
        gamma = self.gamma_at(alpha_sums)
        return (gamma * gamma) * alpha_sums

    def power_and_slope(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d ** gamma, d ** (gamma - 1))`` for ``d >= 0`` (B, H, ...) as the kernels take them (the
        Newton steps of the tau floor): the power as ``d * slope``, one pow instead of two."""
        if self.power == 1:
            return d, (d > 0).to(d.dtype)
        if self.power == 2:
            return d * d, d
        slope = torch.where(d > 0, d.pow(self.gamma_at(d) - 1.0), torch.zeros_like(d))
        return d * slope, slope

    def _one_alpha(self) -> float:
        if self.per_head:
            raise ValueError(f"this spec holds one alpha per head ({self.heads}); ask for its values per head")
        return self.alpha

    def _at(self, name, value_of: Callable, like: torch.Tensor) -> float | torch.Tensor:
        if not self.per_head:
            return value_of(self.alpha)
        if like.dim() < 2 or like.shape[1] != self.heads:
            raise ValueError(f"a tensor that meets per-head alphas must be (B, H, ...) with H = {self.heads}; "
                             f"got {tuple(like.shape)}")
        values = self._per_head(name, value_of, like.dtype, like.device)
        return values.view(-1, *([1] * (like.dim() - 2)))

    def _per_head(self, name, value_of: Callable, dtype: torch.dtype, device) -> torch.Tensor:
        """``value_of(alpha)`` per head as a ``dtype`` tensor on ``device``: from ``table`` where the
        spec has one (computed on its device in float64, made once per ``name`` and dtype), else
        from the values, copied from the host (``head_constants``). ``value_of`` takes a float or a
        float64 tensor alike."""
        if self.table is None:
            if not self.alpha:
                raise ValueError(NO_VALUES)
            return head_constants(tuple(value_of(a) for a in self.alpha), dtype, device)
        key = (name, dtype, str(device))
        if key not in self._made:
            self._made[key] = value_of(self.table.to(device=device, dtype=torch.float64)).to(dtype)
        return self._made[key]


def call_spec(alphas, table: torch.Tensor | None = None) -> EntmaxSpec:
    """The one spec of a call's heads: ``alphas`` one value, one per query head (equal values
    become one float) or none (``()``: the values are on the device alone, in ``table``);
    ``table``: the per-head alphas as float64 on the device, or None / empty where the kernels
    take them from the values (``EntmaxSpec`` drops it where the heads share one alpha)."""
    return EntmaxSpec(tuple(alphas), table if table is not None and table.numel() else None)


def graph_key(alphas) -> tuple:
    """What of ``alphas`` a forward captured as a CUDA graph holds fixed: one alpha (1.5, 2, or the
    alpha of every head); of per-head alphas, only the kernels' ``power``, not the values: the
    kernels read them from the device (``EntmaxSpec.table``), so one graph serves every value that
    training gives them while the compiled forms stay what they were (a head that moves across
    ``APPROX_LOG_MAX_GAMMA``, or onto 1.5 or 2 beside general heads, changes ``power``)."""
    spec = call_spec(alphas)
    return ("per head", spec.power) if spec.per_head else (spec.alpha,)


def alpha_gradient_in_shape(per_head: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """dL/dalpha in the shape and dtype of the alpha tensor given, from its sum per query head
    (heads,) (the per-row ``EntmaxSpec.alpha_gradient`` summed over the batch and the rows):
    summed over the heads too where one alpha is shared by every head."""
    grad = per_head if per_head.numel() == alpha.numel() else per_head.sum()
    return grad.reshape(alpha.shape).to(alpha.dtype)
