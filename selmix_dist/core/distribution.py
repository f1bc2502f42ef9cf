"""From the gain matrix to the pair-sampling distribution, and the max-gain convergence test (docs/method.md §4)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._validate import check_bool_mask, check_choice, check_finite, check_nonnegative, check_square

__all__ = [
    "SUPPORT_RTOL",
    "TEMPERATURE_RULES",
    "selmix_distribution",
    "distribution_and_temperature",
    "distribution_entropy",
    "effective_support",
    "restrict_support",
    "GainConvergence",
]

TEMPERATURE_RULES = ("absolute", "relative", "support")
# rule "support": the solved T puts exp(H) within this relative distance of its target
SUPPORT_RTOL = 1e-3
# the solver searches T in spread(G)·[e^−50, e^50]: at e^−50 any two distinct float64 gains differ by
# ≥ 1e5 in G/T (their gap is ≥ 1e-16·spread), so the softmax is its T → 0 limit; at e^50 it is uniform
_LOG_T_RANGE = 50.0


def _check_number(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def selmix_distribution(
    G: torch.Tensor, temperature: float = 0.1, eps: float = 1e-8, positive_only: bool = True,
    rule: str = "absolute", target_support: float = 1.0,
) -> torch.Tensor:
    """P [K, K] float64 over (label class i, partner class j), summing to 1.

    σ = softmax(G / T) jointly over all K² entries; with m = 1[G > 0] (all ones when
    ``positive_only=False``), P = (σ∘m + ε) / Σ(σ∘m + ε). Uniform over all K² pairs when no gain is positive.
    ``temperature`` T > 0 (the paper's inverse temperature is s = 1/T) is read according to ``rule``:

    * "absolute": T itself (the release);
    * "relative": T·max|G| (docs/method.md §4.1): G scales with squared feature norms and the metric's scale,
      so an absolute T that suits one backbone concentrates P on a single pair with another;
    * "support": ``temperature`` is ignored; T is solved so that the softmax restricted to the allowed
      pairs (m) has effective support exp(H) = ``target_support``·K pairs (at most the allowed count).

    See ``distribution_and_temperature`` for the T actually used.
    """
    return distribution_and_temperature(G, temperature, eps, positive_only, rule, target_support)[0]


def distribution_and_temperature(
    G: torch.Tensor, temperature: float = 0.1, eps: float = 1e-8, positive_only: bool = True,
    rule: str = "absolute", target_support: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """``(P, T)``: ``selmix_distribution``'s P [K, K] float64 (on G's device) and the absolute T of
    σ = softmax(G / T) that it used. T = inf where no T would change P: no allowed pair (P uniform over all
    K² pairs), G ≡ 0, or (rule "support") all allowed gains equal.

    Rule "support" targets exp(H) = clamp(target_support·K, 1, n_allowed) within ``SUPPORT_RTOL`` relative
    (H = entropy of σ restricted to the allowed pairs and renormalised; it grows with T). A target below the
    number of pairs tied at the maximum gain cannot be reached: T is then spread·e^−50 (spread = max − min of
    the allowed gains; the T → 0 limit).
    """
    G = check_square(G, "G")
    check_finite(G, "G")
    t = _check_number(temperature, "temperature", positive=True)
    eps = _check_number(eps, "eps", positive=False)
    check_choice(rule, "rule", TEMPERATURE_RULES)
    target_support = _check_number(target_support, "target_support", positive=True)
    return _distribution(G.detach().to(torch.float64), t, eps, positive_only, rule, target_support)


def _distribution(g: torch.Tensor, t: float, eps: float, positive_only: bool, rule: str,
                  target_support: float) -> tuple[torch.Tensor, float]:
    """``distribution_and_temperature`` on a checked float64 G [K, K] and checked options.

    One new K×K matrix, the rest in place: with σ = q / Σq, q = exp((G − max G)/T) over all K² entries,
    P = (σ∘m + ε) / Σ(σ∘m + ε) = (q∘m + ε Σq) / (Σ(q∘m) + K² ε Σq).
    """
    low, top = (float(x) for x in torch.aminmax(g))
    if positive_only and not top > 0:  # no allowed pair
        return torch.full_like(g, 1.0 / g.numel()), math.inf
    mask = g > 0 if positive_only else None
    if rule == "relative":
        scale = max(top, -low)
        t = t * scale if scale > 0 else math.inf  # G ≡ 0 (positive_only=False): P is uniform for any T
    elif rule == "support":
        allowed = g[mask] if positive_only else g.flatten()
        spread = float(allowed.max() - allowed.min())
        if spread > 0:
            target = min(max(target_support * g.shape[0], 1.0), float(allowed.numel()))
            t = _support_temperature(allowed, spread, target)
        else:  # the restricted softmax is uniform over the allowed pairs for every T
            t = math.inf
    q = torch.sub(g, top).div_(t).exp_()  # the max entry gives exp(0) = 1, so Σq ≥ 1 and nothing overflows
    total = float(q.sum())
    if mask is not None:
        q.mul_(mask)
    # the largest allowed gain has q = 1, so the normaliser is > 0 even with ε = 0
    floor = eps * total
    return q.add_(floor).div_(float(q.sum())), t


def _entropy_and_slope(values: torch.Tensor, log_t: float) -> tuple[float, float]:
    """H(softmax(values / T)) in nats and dH/dlog T = Var(values / T) under that softmax, at T = e^log_t."""
    s = values * math.exp(-log_t)
    log_q = torch.log_softmax(s, dim=0)
    q = log_q.exp()
    mean = (q * s).sum()
    return float(-(q * log_q).sum()), float((q * (s - mean).square()).sum())


def _support_temperature(values: torch.Tensor, spread: float, target: float) -> float:
    """T with exp(H(softmax(values / T))) = target (1 ≤ target ≤ n) within SUPPORT_RTOL relative.

    ``values`` float64 [n], not all equal (``spread`` = max − min > 0). H rises monotonically with log T
    (dH/dlog T = Var ≥ 0) from log(#ties at the max) to log n: Newton's method on log T, kept inside a
    shrinking bracket (bisection when a Newton step leaves it). Scale-free: values·c gives T·c.
    """
    goal = math.log(target)
    tol = math.log1p(SUPPORT_RTOL)  # |H − log target| ≤ tol  ⇒  |exp(H) − target| ≤ SUPPORT_RTOL·target
    lo, hi = math.log(spread) - _LOG_T_RANGE, math.log(spread) + _LOG_T_RANGE
    if _entropy_and_slope(values, lo)[0] - goal >= -tol:  # target at or below the T → 0 limit
        return math.exp(lo)
    u = math.log(spread)
    for _ in range(200):
        h, slope = _entropy_and_slope(values, u)
        if abs(h - goal) <= tol or hi - lo < 1e-12:
            break
        if h > goal:
            hi = u
        else:
            lo = u
        step = (h - goal) / slope if slope > 0 else math.inf
        u = u - step if lo < u - step < hi else 0.5 * (lo + hi)
    return math.exp(u)


def distribution_entropy(P: torch.Tensor) -> float:
    """Entropy −Σ P log P in nats (0·log 0 = 0) of a distribution P (any shape, summing to 1)."""
    p = P.detach().to(torch.float64)
    return float(-torch.special.xlogy(p, p).sum())


def effective_support(P: torch.Tensor) -> float:
    """exp(entropy of P): the number of equally likely pairs with P's entropy (1 to P.numel())."""
    return math.exp(distribution_entropy(P))


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
    """Early-stop test on the max gain (docs/method.md §4.3, without the release's initial 1000 sentinel).

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
