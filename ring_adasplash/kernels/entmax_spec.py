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

from dataclasses import dataclass

import torch

CLOSED_FORM_ALPHAS = (1.5, 2.0)  # tau from the histograms in closed form (gamma 2 and 1)


@dataclass(frozen=True)
class EntmaxSpec:
    """alpha-entmax with a fixed alpha in (1, 2] (checked by ``checks.check_alpha`` upstream)."""

    alpha: float

    @property
    def gamma(self) -> float:
        """The exponent ``1 / (alpha - 1)`` of ``p = [z - tau]_+ ** gamma``."""
        return 1.0 / (self.alpha - 1.0)

    @property
    def closed_form(self) -> bool:
        """Whether tau comes out of the fine histogram in closed form (alpha 1.5 and 2)."""
        return self.alpha in CLOSED_FORM_ALPHAS

    @property
    def power(self) -> int:
        """The kernels' ``POWER`` constant: gamma when it is 1 or 2 (alpha 2 or 1.5), else 0 (general)."""
        return {1.5: 2, 2.0: 1}.get(self.alpha, 0)

    def scale_z(self, softmax_scale: float) -> float:
        """The factor from ``q . k`` to the entmax logit ``z``."""
        return (self.alpha - 1.0) * softmax_scale

    def weights(self, gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability ``p = gap ** gamma`` and backward weight ``u = gap ** (gamma - 1)`` (0 off the
        support) of ``gap = [z - tau]_+``."""
        if self.power == 2:
            return gap * gap, gap
        if self.power == 1:
            return gap, (gap > 0).to(gap.dtype)
        return gap ** self.gamma, torch.where(gap > 0, gap ** (self.gamma - 1), torch.zeros_like(gap))

    def alpha_terms(self, gap: torch.Tensor, p: torch.Tensor, g_minus_delta: torch.Tensor) -> torch.Tensor:
        """The terms ``(g - delta) p (1 - log gap)`` of the alpha gradient's sum (module doc), 0 off the
        support (where ``g`` may be NaN: a NaN value off the support reaches no sum)."""
        positive = gap > 0
        log_gap = torch.log(torch.where(positive, gap, 1.0))
        return torch.where(positive, g_minus_delta * p * (1.0 - log_gap), 0.0)

    def alpha_gradient(self, alpha_sums: torch.Tensor) -> torch.Tensor:
        """dL/dalpha per row (module doc) from ``alpha_sums`` (...), the row sums of ``alpha_terms``."""
        return (self.gamma * self.gamma) * alpha_sums

    def power_and_slope(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d ** gamma, d ** (gamma - 1))`` for ``d >= 0`` as the kernels take them (the Newton
        steps of the tau floor): the power as ``d * slope``, one pow instead of two."""
        if self.power == 1:
            return d, (d > 0).to(d.dtype)
        if self.power == 2:
            return d * d, d
        slope = torch.where(d > 0, d.pow(self.gamma - 1.0), torch.zeros_like(d))
        return d * slope, slope
