"""From the gain matrix to the pair-sampling distribution, and the max-gain convergence test (§3.6–§3.7)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._validate import check_bool_mask, check_finite, check_nonnegative, check_square

__all__ = ["selmix_distribution", "restrict_support", "GainConvergence"]


def _check_number(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def selmix_distribution(
    G: torch.Tensor, temperature: float = 0.1, eps: float = 1e-8, positive_only: bool = True,
    relative: bool = False,
) -> torch.Tensor:
    """P [K, K] float64 over (label class i, partner class j), summing to 1.

    σ = softmax(G / T) jointly over all K² entries; with m = 1[G > 0] (all ones when
    ``positive_only=False``), P = (σ∘m + ε) / Σ(σ∘m + ε). Uniform over all K² pairs when no gain is positive.
    ``temperature`` T > 0 (the paper's inverse temperature is s = 1/T). ``relative=True`` uses T·max|G|
    instead (method doc §3.8.5): G scales with squared feature norms and the metric's scale, so an absolute
    T that suits one backbone concentrates P on a single pair with another; a relative T does not.
    """
    G = check_square(G, "G")
    check_finite(G, "G")
    t = _check_number(temperature, "temperature", positive=True)
    eps = _check_number(eps, "eps", positive=False)
    g = G.detach().to(torch.float64)
    mask = g > 0 if positive_only else torch.ones_like(g, dtype=torch.bool)
    if not bool(mask.any()):
        return torch.full_like(g, 1.0 / g.numel())
    if relative:
        t = t * float(g.abs().max())  # > 0: some gain is positive here
    p = torch.softmax(g.flatten() / t, dim=0).view_as(g)
    if positive_only:
        p.masked_fill_(~mask, 0.0)
    # the largest gain is positive here, so its σ ≥ 1/K² and the normaliser is > 0 even with ε = 0
    p.add_(eps)
    return p.div_(p.sum())


def restrict_support(P: torch.Tensor, label_ok: torch.Tensor, partner_ok: torch.Tensor) -> torch.Tensor:
    """P [K, K] restricted to rows ``label_ok`` and columns ``partner_ok`` (bool [K]) and renormalised.

    Uniform over the allowed pairs if they carry no mass; ValueError if no pair is allowed.
    """
    P = check_square(P, "P")
    check_finite(P, "P")
    check_nonnegative(P, "P")
    k = P.shape[0]
    label_ok = check_bool_mask(label_ok, "label_ok", k).to(P.device)
    partner_ok = check_bool_mask(partner_ok, "partner_ok", k).to(P.device)
    if not bool(label_ok.any()) or not bool(partner_ok.any()):
        raise ValueError(
            f"no allowed pair: {int(label_ok.sum())} label classes and {int(partner_ok.sum())} partner "
            "classes are available"
        )
    allowed = label_ok.unsqueeze(1) & partner_ok.unsqueeze(0)
    p = torch.where(allowed, P.to(torch.float64), torch.zeros((), dtype=torch.float64, device=P.device))
    total = p.sum()
    if total <= 0:
        return allowed.to(torch.float64) / allowed.sum()
    return p / total


class GainConvergence:
    """Early-stop test on the max gain (§3.7, without the release's initial 1000 sentinel).

    ``update(max_gain)`` appends the value and returns True when at least ``window`` values were seen and
    ``|mean(last window) − last| < rel_tol · |mean(last window)|``.
    """

    def __init__(self, window: int = 10, rel_tol: float = 0.05) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self.rel_tol = _check_number(rel_tol, "rel_tol", positive=False)
        self.history: list[float] = []

    def update(self, max_gain: float) -> bool:
        value = float(max_gain)
        if not math.isfinite(value):
            raise ValueError(f"max_gain must be finite, got {max_gain!r}")
        self.history.append(value)
        return self.converged()

    def converged(self) -> bool:
        if len(self.history) < self.window:
            return False
        recent = self.history[-self.window :]
        mean = sum(recent) / self.window
        return abs(mean - recent[-1]) < self.rel_tol * abs(mean)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "rel_tol": self.rel_tol, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"window", "rel_tol", "history"}:
            raise ValueError("GainConvergence state must be a dict with keys window, rel_tol, history")
        fresh = GainConvergence(state["window"], state["rel_tol"])
        for value in state["history"]:
            fresh.update(value)
        self.window, self.rel_tol, self.history = fresh.window, fresh.rel_tol, fresh.history
