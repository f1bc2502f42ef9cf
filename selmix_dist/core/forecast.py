"""Whether the gain predicts: the change of ψ that G forecasts for the steps until the next refresh, against the
validation change that follows (docs/method.md §4.4).

G_ij is the first-order change of ψ per unit learning rate of an SGD step on "i mixed with j, label i" pairs.
A batch drawn from P averages its pairs' gradients, so one step of learning rate η_t changes ψ by about
η_t Σ_ij P_ij G_ij, and the steps from one refresh (step s) to the next (step s') by

    predicted = (Σ_ij P_ij G_ij) · Σ_{t=s}^{s'−1} η_t.

The realised change is ψ at the next refresh minus ψ at this one, both with the multipliers that decided P
(the next refresh updates them only after measuring): only then is it the quantity G is the derivative of.
The ratio realised / predicted near 1 says the first-order model holds; near 0 or negative, that training on P
does not move ψ as the gain says (stale prototypes, pseudo-label noise, a step size outside the linear range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Forecast", "GainForecast"]


@dataclass(frozen=True)
class Forecast:
    """One closed interval: from refresh ``step`` to refresh ``next_step``, the ``predicted`` and ``realised``
    change of ψ (floats)."""

    step: int
    next_step: int
    predicted: float
    realised: float


class GainForecast:
    """The open forecast of the last refresh; ``close`` pairs it with what the next refresh measured."""

    def __init__(self) -> None:
        self._open: dict[str, float] | None = None   # {"step", "rate", "psi"} of the last refresh

    @staticmethod
    def rate(gain: torch.Tensor, distribution: torch.Tensor) -> float:
        """Σ_ij P_ij G_ij of float [K, K] G and P: ψ's expected change per unit learning rate of one step."""
        return float((gain.to(torch.float64) * distribution.to(gain.device, torch.float64)).sum())

    def close(self, step: int, psi_before: float, lr_sum: float) -> Forecast | None:
        """At the refresh of ``step``: ``psi_before`` is ψ of its C with the previous multipliers, ``lr_sum`` the
        learning rates summed over the steps since the open forecast's refresh. None without an open one."""
        if self._open is None or int(self._open["step"]) >= step:
            return None
        start = int(self._open["step"])
        return Forecast(start, step, self._open["rate"] * lr_sum, psi_before - self._open["psi"])

    def open(self, step: int, rate: float, psi: float) -> None:
        """After the refresh of ``step`` decided P: its gain rate and ψ with the new multipliers."""
        self._open = {"step": float(step), "rate": float(rate), "psi": float(psi)}

    def state_dict(self) -> dict[str, Any] | None:
        return None if self._open is None else dict(self._open)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._open = None if state is None else {k: float(state[k]) for k in ("step", "rate", "psi")}
