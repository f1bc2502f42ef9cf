"""Objectives ψ(C) of the joint validation confusion matrix, their gradients Ψ = ∂ψ/∂C and multipliers.

Every objective is evaluated at ``Ĉ = clamp(C, min=1e-7)`` (docs/method.md §2.1): ``psi(C)`` is the
differentiable Lagrangian ψ(Ĉ) with the *current* multipliers (held fixed), divided by the constraint
normaliser ``1 + max λ`` for the coverage objectives; ``gradient(C)`` is its closed-form derivative
(identical to autograd of ``psi`` wherever ``C >= 1e-7``).

Recalls are exact, ``r_i = Ĉ_ii / ρ_i`` with ``ρ_i = Σ_j Ĉ_ij``, so for ``ψ = f(r)``

    Ψ_ab = g_a (δ_ab − r_a) / ρ_a,    g = ∂f/∂r.

The part ``−g_a r_a / ρ_a`` is constant along row a, and a row-constant part of Ψ cancels in
``D = Ψ∘Ĉ − w Ĉ∘((Ψ∘Ĉ)1)1ᵀ`` whenever ``w_a = 1/ρ_a`` (gain.logit_derivative). For a balanced validation
set (ρ_a = 1/K, w = K) the resulting D is therefore exactly the release's D for Ψ = I (mean recall) and
Ψ = K·diag(λ) (min / min head-tail recall), while for unbalanced validation sets this Ψ is the true one.

Classes with no validation sample (raw row sum 0) are excluded from every recall aggregate, as in
``metrics.compute_metrics``: their weight g_a is 0 and the averages run over the n present classes.
Coverage terms ``Σ_j λ_j cov_j`` (``cov_j = Σ_i Ĉ_ij``) add ``λ_b`` to column b of Ψ.

``gradient(C, variant="official")`` instead reproduces the release's Ψ (docs/method.md §2.4, §7), which is not
the derivative of ``psi`` where the release assumes balanced validation rows:

* Ψ = I (mean recall) and Ψ = K·diag(λ) (min / min head-tail recall) for any validation prior;
* H-mean and G-mean scale factors HM² and GM from the *raw* C (0 when a raw recall is 0, so Ψ ≡ 0), except
  for the H-mean with head/tail coverage, which takes HM from Ĉ; ρ and the rest of Ψ from Ĉ as above;
* head/tail multipliers spread as λ_h/(fK) over the classes i < fK and λ_t/((1−f)K) over the rest (f: the
  head fraction, 0.9 in the release), while the head/tail means use the ⌊fK⌋ head classes of ``head``;
  when fK is not an integer the λ spread therefore covers one class more than the head: the release's class
  ⌊fK⌋ by index (the most frequent tail class of its index-sorted CIFAR-LT data), here the lowest-index tail
  class;
* the H-mean with head/tail coverage is divided by 1 + max_j λ_j over those per-class values.

Multipliers are recomputed by ``update_multipliers(C, variant)`` once per refresh, before ``gradient``.
Variant "exact" computes them from the *raw* C, i.e. from the recalls and coverages that
``metrics.compute_metrics`` reports (the clamp is a guard for Ψ, not part of the metric). Variant "official"
computes them as the release does, from its clipped matrix Ĉ: recalls Ĉ_ii / Σ_j Ĉ_ij in the min-recall
updates, the *unnormalised* column sums Σ_i Ĉ_ij as coverages, and head/tail recall multipliers that are
always memoryless (the release ignores β there). Each entry below 1e-7 adds up to 1e-7 to its row's and its
column's sum, so the variants' recalls and coverages differ by up to K·1e-7 (docs/method.md §2.3).
In both, classes without a validation sample get no multiplier weight (the release has no such classes).
Defaults follow the release's fine-tuning configs (docs/method.md §2.3): β = 0 and ω = 50 for the min-recall
objectives (so λ = softmax(−ω r), a memoryless soft-min); α = 0.95, τ = 0.01, λ_max = 100 for the coverage
objectives.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

import torch

from ._validate import check_bool_mask, check_choice, check_finite, check_nonnegative, check_num_classes, check_square

__all__ = [
    "CLAMP_MIN",
    "GAIN_VARIANTS",
    "Objective",
    "MeanRecall",
    "MinRecall",
    "MinHeadTailRecall",
    "HMean",
    "GMean",
    "MeanRecallMinCoverage",
    "HMeanMinCoverage",
    "MeanRecallMinHeadTailCoverage",
    "HMeanMinHeadTailCoverage",
    "CustomObjective",
    "OBJECTIVES",
    "ALIASES",
    "build_objective",
]

CLAMP_MIN = 1e-7
# "exact": our documented choices; "official": the release's Ψ here and its positive gain term in gain.py
GAIN_VARIANTS = ("exact", "official")


def _check_confusion(C: object, num_classes: int | None) -> torch.Tensor:
    C = check_square(C, "C", num_classes)
    if not C.is_floating_point():
        raise ValueError(f"C must be a floating-point joint confusion matrix, got {C.dtype}")
    check_finite(C, "C")
    check_nonnegative(C, "C")
    if not bool(C.detach().sum() > 0):
        raise ValueError("C is all zero")
    return C


def _recalls_of(m: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """m_ii / Σ_j m_ij, float64 [K] on m's device; 0 for the classes that are not ``present``."""
    rows = torch.where(present, m.sum(dim=1), 1.0)
    return torch.where(present, m.diagonal() / rows, 0.0)


def _coverages_of(m: torch.Tensor, official: bool) -> torch.Tensor:
    """Column sums of m, float64 [K]: the release's unnormalised Σ_i Ĉ_ij, or the fractions Σ_i C_ij / Σ C."""
    columns = m.sum(dim=0)
    return columns if official else columns / columns.sum()


def _param(params: dict[str, Any], key: str, *, low: float, low_open: bool, high: float = math.inf) -> float:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"objective parameter {key!r} must be a number, got {value!r}")
    value = float(value)
    ok = (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"objective parameter {key!r} must be finite and {bound}, got {value}")
    return value


class Objective:
    """Base class: ψ(C), Ψ = ∂ψ/∂C, multipliers and their state.

    Attributes: ``name`` (registry key), ``num_classes`` (K), ``target_metric`` (key of
    ``metrics.compute_metrics`` that the objective optimises), ``constraint_metrics`` (keys that report the
    constraints, empty for unconstrained objectives), ``params`` (hyper-parameters), ``head`` (bool[K] or
    None), ``head_fraction`` (the f that ``head`` was built with, ⌊fK⌋ head classes; used only by the
    release's head/tail multiplier spread of ``gradient(C, variant="official")``).
    """

    name: str = ""
    target_metric: str = ""
    constraint_metrics: tuple[str, ...] = ()
    requires_head: bool = False
    defaults: dict[str, Any] = {}
    # the ε of P that the release hard-codes for this objective where it differs from the configured one
    release_eps: float | None = None

    def __init__(
        self, num_classes: int, head: torch.Tensor | None = None, head_fraction: float = 0.9, **params: Any
    ) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.params = self._check_params(params)
        self.head = self._check_head(head)
        if isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float)) or not (
            0.0 < head_fraction <= 1.0
        ):
            raise ValueError(f"head_fraction must be a number in (0, 1], got {head_fraction!r}")
        self.head_fraction = float(head_fraction)
        self._multipliers: dict[str, torch.Tensor] = self._initial_multipliers()

    # ---- hyper-parameters, head mask, state --------------------------------------------------------
    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"objective {self.name!r} has no parameter(s) {unknown}; valid: {sorted(self.defaults)}"
            )
        merged = {**self.defaults, **params}
        self._validate_params(merged)
        return merged

    def _validate_params(self, params: dict[str, Any]) -> None:
        """Raise ValueError naming an invalid hyper-parameter (subclasses override)."""

    def _check_head(self, head: torch.Tensor | None) -> torch.Tensor | None:
        if head is None:
            if self.requires_head:
                raise ValueError(f"objective {self.name!r} needs a head mask (bool[{self.num_classes}])")
            return None
        head = check_bool_mask(head, "head", self.num_classes).detach().cpu().clone()
        if self.requires_head and (bool(head.all()) or not bool(head.any())):
            raise ValueError(f"objective {self.name!r} needs at least one head and one tail class")
        return head

    def _release_head_tail_spread(self, lam_head: torch.Tensor, lam_tail: torch.Tensor) -> torch.Tensor:
        """The release's per-class multipliers, float64 [K]: λ_h/(fK) on the classes "i < fK", λ_t/((1−f)K)
        on the rest; those classes are ``head`` plus, when fK is not an integer, the lowest-index tail class."""
        k, f = self.num_classes, self.head_fraction
        n_head = int(self.head.sum())
        fk = round(f * k, 9)  # as head_tail_masks: 0.9 * 30 = 27.000000000000004 is the integer 27
        if n_head != math.floor(fk):
            raise ValueError(
                f"objective {self.name!r}: head has {n_head} classes but head_fraction={f} gives "
                f"floor({f}·{k}) = {math.floor(fk)} (build both from the same fraction: head_tail_masks)"
            )
        spread_head = self.head.clone()
        if fk != n_head:
            spread_head[torch.nonzero(~self.head)[0, 0]] = True
        return torch.where(spread_head, lam_head.double() / (f * k), lam_tail.double() / ((1.0 - f) * k))

    def _initial_multipliers(self) -> dict[str, torch.Tensor]:
        return {}

    def multipliers(self) -> dict[str, torch.Tensor]:
        """Current multipliers (copies, float64, for logging)."""
        return {k: v.clone() for k, v in self._multipliers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "params": dict(self.params),
            "multipliers": self.multipliers(),
            "head": None if self.head is None else self.head.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore hyper-parameters, head mask and multipliers; ValueError if they do not fit."""
        if not isinstance(state, dict):
            raise ValueError(f"objective state must be a dict, got {type(state).__name__}")
        missing = sorted({"name", "num_classes", "params", "multipliers"} - set(state))
        if missing:
            raise ValueError(f"objective state lacks {missing}")
        if state["name"] != self.name:
            raise ValueError(f"objective state is for {state['name']!r}, not {self.name!r}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"objective state has K={state['num_classes']}, this objective K={self.num_classes}"
            )
        params = self._check_params(dict(state["params"]))
        head = self._check_head(state.get("head"))
        mults = state["multipliers"]
        if not isinstance(mults, dict) or set(mults) != set(self._multipliers):
            got = sorted(mults) if isinstance(mults, dict) else mults
            raise ValueError(f"objective state multipliers {got} != expected {sorted(self._multipliers)}")
        new = {}
        for key, ref in self._multipliers.items():
            value = torch.as_tensor(mults[key], dtype=torch.float64).cpu()
            if value.shape != ref.shape:
                raise ValueError(
                    f"multiplier {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            check_finite(value, f"multiplier {key!r}")
            check_nonnegative(value, f"multiplier {key!r}")
            new[key] = value.clone()
        self.params, self.head, self._multipliers = params, head, new

    # ---- the objective ---------------------------------------------------------------------------------
    def psi(self, C: torch.Tensor) -> torch.Tensor:
        """Scalar ψ(Ĉ) (differentiable w.r.t. ``C`` [K, K]); multipliers are constants."""
        C = _check_confusion(C, self.num_classes)
        present = C.detach().sum(dim=1) > 0
        return self._psi(C.clamp_min(CLAMP_MIN), present)

    def gradient(self, C: torch.Tensor, variant: str = "exact") -> torch.Tensor:
        """Ψ float64 [K, K] on ``C``'s device: the closed-form ∂psi/∂C at Ĉ (variant "exact") or the release's
        Ψ (variant "official", see the module docstring)."""
        check_choice(variant, "variant", GAIN_VARIANTS)
        C = _check_confusion(C, self.num_classes).detach().to(torch.float64)
        with torch.no_grad():
            return self._gradient_from(C, C.clamp_min(CLAMP_MIN), C.sum(dim=1) > 0, variant)

    def update_multipliers(self, C: torch.Tensor, variant: str = "exact") -> None:
        """Recompute the multipliers from the validation C [K, K] (once per refresh, before ``gradient``): from
        the raw C (variant "exact") or, as the release, from Ĉ = clamp(C, 1e-7) (variant "official")."""
        check_choice(variant, "variant", GAIN_VARIANTS)
        C = _check_confusion(C, self.num_classes).detach().to(torch.float64)
        with torch.no_grad():
            source = C.clamp_min(CLAMP_MIN) if variant == "official" else C
            self._update_from(source, C.sum(dim=1) > 0, variant)

    # ---- the refresh's entry points: inputs validated once by the caller (core.refresh) ----------------
    def _gradient_from(self, C: torch.Tensor, ch: torch.Tensor, present: torch.Tensor, variant: str) -> torch.Tensor:
        """Ψ from a checked float64 C [K, K], ``ch`` = clamp(C, 1e-7) and ``present`` = C's row sums > 0."""
        if variant == "official":
            return self._release_gradient(C, ch, present)
        return self._gradient(ch, present)

    def _update_from(self, source: torch.Tensor, present: torch.Tensor, variant: str) -> None:
        """Multipliers from a checked float64 ``source`` [K, K]: Ĉ for variant "official", else the raw C."""
        self._update(source, present, variant == "official")

    def _psi(self, ch: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _gradient(self, ch: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _release_gradient(self, C: torch.Tensor, ch: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The release's Ψ from the raw ``C`` and ``ch`` = Ĉ."""
        raise NotImplementedError

    def _update(self, m: torch.Tensor, present: torch.Tensor, official: bool) -> None:
        """Multipliers from ``m`` (the raw C, or Ĉ when ``official``) and ``present`` bool[K]; objectives
        without multipliers have nothing to update."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, params={self.params})"


class _RecallObjective(Objective):
    """ψ = [f(r) + Σ_j λ_j cov_j] / normaliser, with f one of the recall aggregates below."""

    base: str = "mean"  # "mean" | "hmean" | "gmean" | "weighted"

    def _recall_weights(self, present: torch.Tensor) -> torch.Tensor:
        """Lagrangian weights on r (only for base == "weighted"), zero for absent classes."""
        raise NotImplementedError

    def _column_multipliers(self) -> torch.Tensor | None:
        """λ_j of the coverage term, float64 [K] (None without a coverage constraint)."""
        return None

    def _normaliser(self) -> float:
        return 1.0

    def _release_recall_weights(self, present: torch.Tensor) -> torch.Tensor:
        """λ_i of the release's Ψ = K·diag(λ) (only for base == "weighted")."""
        raise NotImplementedError

    def _release_column_multipliers(self) -> torch.Tensor | None:
        return self._column_multipliers()

    def _release_normaliser(self) -> float:
        return self._normaliser()

    # the release computes HM and GM of Ψ from the raw C, except for this objective's H-mean (from Ĉ)
    release_value_from_clipped: bool = False

    def _base_value(self, r: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mask = present.to(r.dtype)
        n = mask.sum()
        if self.base == "mean":
            return (r * mask).sum() / n
        if self.base == "hmean":
            return n / (mask / r).sum()
        if self.base == "gmean":
            return torch.exp((torch.log(r) * mask).sum() / n)
        return (self._recall_weights(present).to(r) * r).sum()

    def _base_weights(self, r: torch.Tensor, present: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        """g = ∂f/∂r, float64 [K]; ``value`` replaces f(r) in the H-mean/G-mean factor (the release's raw HM/GM)."""
        mask = present.to(r.dtype)
        n = mask.sum()
        if self.base == "mean":
            return mask / n
        if self.base == "hmean":
            value = self._base_value(r, present) if value is None else value
            return mask * value**2 / (n * r**2)
        if self.base == "gmean":
            value = self._base_value(r, present) if value is None else value
            return mask * value / (n * r)
        return self._recall_weights(present).to(r)

    def _psi(self, ch: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        r = ch.diagonal() / ch.sum(dim=1)
        value = self._base_value(r, present)
        lam = self._column_multipliers()
        if lam is not None:
            value = value + (lam.to(ch) * ch.sum(dim=0)).sum()
        return value / self._normaliser()

    def _recall_terms(
        self, ch: torch.Tensor, present: torch.Tensor, value: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """∂f(r)/∂C_ab = coef_a (δ_ab − r_a) at Ĉ as (coef, −coef∘r), float64 [K] each."""
        rho = ch.sum(dim=1)
        r = ch.diagonal() / rho
        coef = self._base_weights(r, present, value) / rho
        return coef, -(coef * r)

    @staticmethod
    def _assemble(diag: torch.Tensor, row: torch.Tensor, lam: torch.Tensor | None, norm: float) -> torch.Tensor:
        """Ψ_ab = (δ_ab diag_a + row_a + λ_b) / norm: a diagonal, a row constant and a column constant."""
        grad = row.unsqueeze(1) + (lam.to(row) if lam is not None else torch.zeros_like(row)).unsqueeze(0)
        grad.diagonal().add_(diag)
        return grad if norm == 1.0 else grad.div_(norm)

    def _gradient(self, ch: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        coef, row = self._recall_terms(ch, present)
        return self._assemble(coef, row, self._column_multipliers(), self._normaliser())

    def _release_gradient(self, C: torch.Tensor, ch: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        k = self.num_classes
        if self.base in ("mean", "weighted"):
            # Ψ = I (ψ = Σ_i C_ii) or K·diag(λ): the recall derivative if every ρ_i were 1/K
            row = torch.zeros(k, dtype=torch.float64, device=ch.device)
            diag = torch.ones_like(row) if self.base == "mean" else k * self._release_recall_weights(present).to(row)
        else:
            source = ch if self.release_value_from_clipped else C
            rho = source.sum(dim=1)
            # raw recalls of the present classes (absent ones weigh 0; 1 keeps log and 1/r finite)
            r = torch.where(present, source.diagonal() / torch.where(present, rho, 1.0), 1.0)
            diag, row = self._recall_terms(ch, present, value=self._base_value(r, present))
        return self._assemble(diag, row, self._release_column_multipliers(), self._release_normaliser())


class MeanRecall(_RecallObjective):
    """ψ = mean recall over the present classes."""

    name = "mean_recall"
    target_metric = "mean_recall"
    base = "mean"
    release_eps = 1e-10  # the release's MeanRecall adds 1e-10 to P, every other objective 1e-8


class HMean(_RecallObjective):
    """ψ = n / Σ_i 1/r_i over the n present classes (at Ĉ, so a zero recall does not zero Ψ)."""

    name = "h_mean"
    target_metric = "h_mean"
    base = "hmean"


class GMean(_RecallObjective):
    """ψ = (Π_i r_i)^(1/n) over the n present classes, computed in log space."""

    name = "g_mean"
    target_metric = "g_mean"
    base = "gmean"


def _softmin_update(
    old: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, beta: float, omega: float
) -> torch.Tensor:
    """λ ← λ^β exp(−ω v) normalised over ``valid`` entries (0 elsewhere), computed in log space."""
    # clamp: a weight that reached 0 stays ~0 under β > 0 instead of producing log(0) * 0 = NaN.
    logits = beta * torch.log(old.clamp_min(1e-300)) - omega * values
    logits = torch.where(valid, logits, torch.full_like(logits, -math.inf))
    return torch.softmax(logits, dim=0)


class MinRecall(_RecallObjective):
    """min_i r_i via the Lagrangian Σ_i λ_i r_i, λ on the simplex (exponentiated-gradient multipliers).

    ``update_multipliers``: λ ← λ^β exp(−ω r) normalised, over present classes (absent ones get λ = 0).
    Defaults β = 0, ω = 50 (the release's configs; β = 0 makes λ = softmax(−ω r)). Initial λ = 1/K.
    """

    name = "min_recall"
    target_metric = "min_recall"
    base = "weighted"
    defaults = {"beta": 0.0, "omega": 50.0}

    def _validate_params(self, params: dict[str, Any]) -> None:
        params["beta"] = _param(params, "beta", low=0.0, low_open=False)
        params["omega"] = _param(params, "omega", low=0.0, low_open=False)

    def _initial_multipliers(self) -> dict[str, torch.Tensor]:
        return {"lambda": torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)}

    def _update(self, m: torch.Tensor, present: torch.Tensor, official: bool) -> None:
        r = _recalls_of(m, present).cpu()
        self._multipliers["lambda"] = _softmin_update(self._multipliers["lambda"], r, present.cpu(), **self._eg())

    def _eg(self, official: bool = False) -> dict[str, float]:
        return {"beta": self.params["beta"], "omega": self.params["omega"]}

    def _recall_weights(self, present: torch.Tensor) -> torch.Tensor:
        w = self._multipliers["lambda"].to(present.device) * present
        total = w.sum()
        # renormalise over the present classes; uniform if the multipliers put no mass on them
        if total > 0:
            return w / total
        return present.to(torch.float64) / present.sum()

    def _release_recall_weights(self, present: torch.Tensor) -> torch.Tensor:
        return self._multipliers["lambda"]


class MinHeadTailRecall(MinRecall):
    """min(r̄_H, r̄_T) via λ_h r̄_H + λ_t r̄_T (r̄ = mean recall over the present head/tail classes).

    ``update_multipliers``: (λ_h, λ_t) ← (λ_h, λ_t)^β exp(−ω [r̄_H, r̄_T]) normalised (β = 0: memoryless
    soft-min; variant "official" always uses β = 0, as the release). Initial λ_h = λ_t = 1/2. Head/tail come
    from ``head`` (never index ranges).
    """

    name = "min_head_tail_recall"
    target_metric = "min_head_tail_recall"
    requires_head = True

    def _initial_multipliers(self) -> dict[str, torch.Tensor]:
        half = torch.tensor(0.5, dtype=torch.float64)
        return {"lambda_head": half.clone(), "lambda_tail": half.clone()}

    def _groups(self, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head.to(present.device)
        return head & present, ~head & present

    def _update(self, m: torch.Tensor, present: torch.Tensor, official: bool) -> None:
        r = _recalls_of(m, present).cpu()
        groups = self._groups(present.cpu())
        means = torch.stack([r[g].sum() / max(int(g.sum()), 1) for g in groups])
        valid = torch.tensor([bool(g.any()) for g in groups])
        old = torch.stack([self._multipliers["lambda_head"], self._multipliers["lambda_tail"]])
        lam = _softmin_update(old, means, valid, **self._eg(official))
        self._multipliers = {"lambda_head": lam[0].clone(), "lambda_tail": lam[1].clone()}

    def _eg(self, official: bool = False) -> dict[str, float]:
        # the release's head/tail update is always memoryless: (λ_h, λ_t) = softmax(−ω [r̄_H, r̄_T])
        return {"beta": 0.0 if official else self.params["beta"], "omega": self.params["omega"]}

    def _recall_weights(self, present: torch.Tensor) -> torch.Tensor:
        head, tail = self._groups(present)
        lam_h = float(self._multipliers["lambda_head"]) if head.any() else 0.0
        lam_t = float(self._multipliers["lambda_tail"]) if tail.any() else 0.0
        if lam_h + lam_t <= 0:  # no mass on a non-empty group: weigh the groups equally
            lam_h, lam_t = float(head.any()), float(tail.any())
        total = lam_h + lam_t
        w = torch.zeros(self.num_classes, dtype=torch.float64, device=present.device)
        w[head] = lam_h / total / max(int(head.sum()), 1)
        w[tail] = lam_t / total / max(int(tail.sum()), 1)
        return w

    def _release_recall_weights(self, present: torch.Tensor) -> torch.Tensor:
        return self._release_head_tail_spread(self._multipliers["lambda_head"], self._multipliers["lambda_tail"])


class _CoverageObjective(_RecallObjective):
    """Base recall aggregate subject to coverage ≥ α/K, per class or for the head/tail means.

    Multipliers: ``update="closed_form"`` (release) λ = max(0, λ_max (1 − exp(−v/τ))) with violation
    v = α/K − cov; ``update="dual"`` accumulates λ ← clip(λ − ω (cov − α/K), 0, λ_max) (starts at 0).
    ψ = [f(r) + Σ_j λ_j cov_j] / (1 + max λ), where for head/tail constraints λ_j = λ_h/|H| on head
    columns and λ_t/|T| on tail columns and the normaliser is 1 + max(λ_h, λ_t) for both base aggregates
    (the release uses 1 + max_j λ_j for the H-mean variant — docs/method.md §7 — and its own λ_j spread:
    both reproduced by ``gradient(C, variant="official")``).
    """

    head_tail: bool = False
    defaults = {"alpha": 0.95, "tau": 0.01, "lambda_max": 100.0, "update": "closed_form", "omega": 50.0}

    def _validate_params(self, params: dict[str, Any]) -> None:
        params["alpha"] = _param(params, "alpha", low=0.0, low_open=True, high=1.0)
        params["tau"] = _param(params, "tau", low=0.0, low_open=True)
        params["lambda_max"] = _param(params, "lambda_max", low=0.0, low_open=True)
        params["omega"] = _param(params, "omega", low=0.0, low_open=True)
        if params["update"] not in ("closed_form", "dual"):
            raise ValueError(
                f"objective parameter 'update' must be 'closed_form' or 'dual', got {params['update']!r}"
            )

    def _initial_multipliers(self) -> dict[str, torch.Tensor]:
        if self.head_tail:
            zero = torch.tensor(0.0, dtype=torch.float64)
            return {"lambda_head": zero.clone(), "lambda_tail": zero.clone()}
        return {"lambda": torch.zeros(self.num_classes, dtype=torch.float64)}

    def _update(self, m: torch.Tensor, present: torch.Tensor, official: bool) -> None:
        cov = _coverages_of(m, official).cpu()
        if self.head_tail:
            cov = torch.stack([cov[self.head].mean(), cov[~self.head].mean()])
            old = torch.stack([self._multipliers["lambda_head"], self._multipliers["lambda_tail"]])
        else:
            old = self._multipliers["lambda"]
        violation = self.params["alpha"] / self.num_classes - cov
        lam_max = self.params["lambda_max"]
        if self.params["update"] == "closed_form":
            # −expm1(−v/τ) = 1 − exp(−v/τ), accurate for small v; satisfied constraints (v ≤ 0) give 0.
            lam = torch.where(violation > 0, -lam_max * torch.expm1(-violation / self.params["tau"]), 0.0)
        else:
            lam = (old + self.params["omega"] * violation).clamp(0.0, lam_max)
        if self.head_tail:
            self._multipliers = {"lambda_head": lam[0].clone(), "lambda_tail": lam[1].clone()}
        else:
            self._multipliers = {"lambda": lam}

    def _column_multipliers(self) -> torch.Tensor:
        if not self.head_tail:
            return self._multipliers["lambda"]
        head = self.head
        lam = torch.empty(self.num_classes, dtype=torch.float64)
        lam[head] = self._multipliers["lambda_head"] / int(head.sum())
        lam[~head] = self._multipliers["lambda_tail"] / int((~head).sum())
        return lam

    def _normaliser(self) -> float:
        return 1.0 + max(float(v.max()) for v in self._multipliers.values())

    def _release_column_multipliers(self) -> torch.Tensor:
        if not self.head_tail:
            return self._multipliers["lambda"]
        return self._release_head_tail_spread(self._multipliers["lambda_head"], self._multipliers["lambda_tail"])


class MeanRecallMinCoverage(_CoverageObjective):
    """max mean recall s.t. cov_j ≥ α/K for every class j."""

    name = "mean_recall_min_coverage"
    target_metric = "mean_recall"
    constraint_metrics = ("min_coverage", "coverage_violation")
    base = "mean"


class HMeanMinCoverage(_CoverageObjective):
    """max H-mean s.t. cov_j ≥ α/K for every class j."""

    name = "h_mean_min_coverage"
    target_metric = "h_mean"
    constraint_metrics = ("min_coverage", "coverage_violation")
    base = "hmean"


class MeanRecallMinHeadTailCoverage(_CoverageObjective):
    """max mean recall s.t. mean head coverage ≥ α/K and mean tail coverage ≥ α/K."""

    name = "mean_recall_min_head_tail_coverage"
    target_metric = "mean_recall"
    constraint_metrics = ("head_coverage", "tail_coverage")
    base = "mean"
    head_tail = True
    requires_head = True


class HMeanMinHeadTailCoverage(_CoverageObjective):
    """max H-mean s.t. mean head coverage ≥ α/K and mean tail coverage ≥ α/K."""

    name = "h_mean_min_head_tail_coverage"
    target_metric = "h_mean"
    constraint_metrics = ("head_coverage", "tail_coverage")
    base = "hmean"
    head_tail = True
    requires_head = True
    release_value_from_clipped = True

    def _release_normaliser(self) -> float:
        # the release divides by 1 + the largest per-class λ_j (its mean-recall twin by 1 + max(λ_h, λ_t))
        return 1.0 + float(self._release_column_multipliers().max())


class CustomObjective(Objective):
    """A user-defined ψ: ``fn(Ĉ) -> scalar tensor`` built from differentiable torch ops; Ψ by autograd.

    ``num_classes`` is optional (None accepts any K). No multipliers; ``target_metric`` may be None.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        name: str = "custom",
        target_metric: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.fn = fn
        self.name = name
        self.target_metric = target_metric
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
        self.params = {}
        self.head = None
        self._multipliers = {}

    def _call(self, ch: torch.Tensor) -> torch.Tensor:
        value = self.fn(ch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"custom objective {self.name!r} must return a scalar tensor, got {value!r}")
        return value.reshape(())

    def psi(self, C: torch.Tensor) -> torch.Tensor:
        C = _check_confusion(C, self.num_classes)
        return self._call(C.clamp_min(CLAMP_MIN))

    def _gradient_from(self, C: torch.Tensor, ch: torch.Tensor, present: torch.Tensor, variant: str) -> torch.Tensor:
        """Ψ by autograd at Ĉ, for both variants (the release has no custom objectives to reproduce)."""
        ch = ch.detach().clone().requires_grad_(True)  # a copy: ``fn`` must not alter the refresh's Ĉ
        with torch.enable_grad():
            value = self._call(ch)
            grad = torch.autograd.grad(value, ch, allow_unused=True)[0] if value.requires_grad else None
        if grad is None:  # ψ does not depend on C
            return torch.zeros_like(ch.detach())
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(f"custom objective {self.name!r} has a non-finite gradient at this C")
        return grad.detach()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else state
            raise ValueError(f"objective state is for {got!r}, not {self.name!r}")
        if state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"objective state has K={state.get('num_classes')}, this objective K={self.num_classes}"
            )


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MeanRecall,
        MinRecall,
        MinHeadTailRecall,
        HMean,
        GMean,
        MeanRecallMinCoverage,
        HMeanMinCoverage,
        MeanRecallMinHeadTailCoverage,
        HMeanMinHeadTailCoverage,
    )
}

# The release's config names (`M:` keys) for the same objectives.
ALIASES: dict[str, str] = {
    "min_HT_recall": "min_head_tail_recall",
    "HM_min_coverage": "h_mean_min_coverage",
    "mean_recall_min_HT_coverage": "mean_recall_min_head_tail_coverage",
    "HM_min_HT_coverage": "h_mean_min_head_tail_coverage",
}


def build_objective(
    name: str, num_classes: int, head: torch.Tensor | None = None, head_fraction: float = 0.9, **params: Any
) -> Objective:
    """Instantiate a registered objective (or a release alias). ``head`` is used by the head/tail ones;
    ``head_fraction`` is the f it was built with (``head_tail_masks``), read by the release's λ spread."""
    key = ALIASES.get(name, name)
    if key not in OBJECTIVES:
        choices = sorted(OBJECTIVES) + sorted(ALIASES)
        closest = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.0)
        hint = f"; did you mean {closest[0]!r}?" if closest else ""
        raise ValueError(f"unknown objective {name!r}{hint} valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[key](num_classes, head=head, head_fraction=head_fraction, **params)
