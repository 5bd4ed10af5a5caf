"""alpha-entmax, made once from alpha: every place that needs alpha reads this object.

``p_j = [z_j - tau]_+ ** gamma`` with ``gamma = 1 / (alpha - 1)`` and ``z = (alpha - 1) * scale * q.k``;
the backward weight is ``u_j = p_j ** (2 - alpha) = [z_j - tau]_+ ** (gamma - 1)``.
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

    def power_and_slope(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d ** gamma, d ** (gamma - 1))`` for ``d >= 0`` as the kernels take them (the Newton
        steps of the tau floor): the power as ``d * slope``, one pow instead of two."""
        if self.power == 1:
            return d, (d > 0).to(d.dtype)
        if self.power == 2:
            return d * d, d
        slope = torch.where(d > 0, d.pow(self.gamma - 1.0), torch.zeros_like(d))
        return d * slope, slope
