"""One SelMix refresh as a pure function (docs/method.md §3.1–§4.2): validation statistics → P.

From the validation confusion counts and per-class feature sums of the current head: the joint confusion
C, the prototypes Z, the objective's multipliers (updated in place: they are its state), Ψ = ∂ψ/∂C, the
gain matrix G and the pair distribution P. The trainer, the gain benchmark and the tests all call this one
sequence; ``update_objective`` is its first half for users of Ψ without a gain (cost-sensitive heads).

The inputs are validated once, here; C is clamped once, and the objective, gain and distribution steps
below run on the checked tensors without re-validating them (each is a pass over K² entries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ._validate import check_choice, check_finite, check_nonnegative, check_square
from .confusion import joint_confusion
from .distribution import TEMPERATURE_RULES, _distribution, distribution_entropy, effective_support
from .gain import PRIORS, _check_head, _check_options, _gain_from_clipped
from .objectives import CLAMP_MIN, GAIN_VARIANTS, Objective

__all__ = ["RefreshSettings", "Refresh", "selmix_refresh", "update_objective"]


@dataclass(frozen=True)
class RefreshSettings:
    """How G and P are computed; mirrors the config section ``selmix`` (same names, same defaults).

    temperature: T of P = softmax(G / T) for rule "absolute" (the release), T·max|G| for "relative".
    temperature_rule: "absolute", "relative", or "support" (T solved so that the softmax over the allowed
        pairs has effective support exp(H) = target_support·K pairs; ``temperature`` is then unused).
    target_support: rule "support" only: effective pairs as a multiple of K (capped at the allowed pairs).
    eps: ε added to every entry of P before renormalising (variant "official": the release's ε of the
        objective where it hard-codes another, ``Objective.release_eps``: 1e-10 for mean recall).
    positive_only: keep only pairs with positive gain (P uniform over all K² pairs if none).
    uniform: ignore G; P uniform over all K² pairs (the plain-mixup baseline).
    gain_variant: "exact" (our documented choices) or "official" (reproduces the release: multipliers from
        the clipped C in ``Objective.update_multipliers``, its Ψ in ``Objective.gradient``, its positive gain
        term in ``gain_matrix`` and its ε).
    include_bias: model the bias update in the gain.
    prior: class prior in dC/dA, "balanced" (K) or "empirical" (1/ρ_k).
    mixup_min: λ ~ U[mixup_min, 1] in training; the gain uses λ̄ = (mixup_min + 1) / 2.
    """

    temperature: float = 0.1
    temperature_rule: str = "absolute"
    target_support: float = 1.0
    eps: float = 1e-8
    positive_only: bool = True
    uniform: bool = False
    gain_variant: str = "exact"
    include_bias: bool = False
    prior: str = "balanced"
    mixup_min: float = 0.6

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"RefreshSettings.{f.name} must be a bool, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"RefreshSettings.{f.name} must be a finite number, got {value!r}")
        checks = (
            ("temperature", self.temperature > 0, "> 0"),
            ("target_support", self.target_support > 0, "> 0"),
            ("eps", self.eps >= 0, ">= 0"),
            ("mixup_min", 0 <= self.mixup_min <= 1, "in [0, 1]"),
            ("temperature_rule", self.temperature_rule in TEMPERATURE_RULES, f"one of {TEMPERATURE_RULES}"),
            ("gain_variant", self.gain_variant in GAIN_VARIANTS, f"one of {GAIN_VARIANTS}"),
            ("prior", self.prior in PRIORS, f"one of {PRIORS}"),
        )
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"RefreshSettings.{name} must be {requirement}, got {getattr(self, name)!r}")

    @property
    def mixup_mean(self) -> float:
        """λ̄, the mean of U[mixup_min, 1]."""
        return (self.mixup_min + 1.0) / 2.0


@dataclass
class Refresh:
    """Everything one refresh computed, on the head's device.

    joint: float64[K, K] C = counts / counts.sum().       prototypes: float64[K, d] validation class means.
    psi: float64[K, K] Ψ = ∂ψ/∂C (None when uniform).     gain: float64[K, K] G (zeros when uniform).
    distribution: float64[K, K] P, summing to 1.
    temperature: the absolute T of P = softmax(G / T) before ε (inf where no T would change P: uniform
        setting, no positive gain, G ≡ 0, or rule "support" with all allowed gains equal).
    """

    joint: torch.Tensor
    prototypes: torch.Tensor
    psi: torch.Tensor | None
    gain: torch.Tensor
    distribution: torch.Tensor
    temperature: float

    @property
    def max_gain(self) -> float:
        return float(self.gain.max())

    @property
    def entropy(self) -> float:
        """Entropy of P in nats."""
        return distribution_entropy(self.distribution)

    @property
    def effective_support(self) -> float:
        """exp(entropy of P): the number of equally likely pairs with P's entropy (1 to K²)."""
        return effective_support(self.distribution)


def update_objective(counts: torch.Tensor, objective: Objective, device: torch.device | None = None,
                     variant: str = "exact") -> torch.Tensor:
    """C = counts / counts.sum() (float64 [K, K], on ``device``, default counts'), then
    ``objective.update_multipliers(C, variant)`` (before any gradient; from the raw C for "exact", from the
    clipped C as the release for "official"); returns C."""
    check_choice(variant, "variant", GAIN_VARIANTS)
    joint = joint_confusion(counts).to(device)
    objective.update_multipliers(joint, variant=variant)
    return joint


def _check_statistics(counts: object, feature_sums: object, weight: object, bias: object, objective: Objective,
                      settings: RefreshSettings) -> int:
    counts = check_square(counts, "counts")
    k = counts.shape[0]
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"counts must be an integer [K, K] confusion matrix, got {counts.dtype}")
    if bool(counts.amin() < 0):
        raise ValueError("counts has negative entries")
    if not isinstance(feature_sums, torch.Tensor) or feature_sums.dim() != 2 or not feature_sums.is_floating_point():
        shape = tuple(feature_sums.shape) if isinstance(feature_sums, torch.Tensor) else type(feature_sums).__name__
        raise ValueError(f"feature_sums must be a floating-point [K, d] tensor, got {shape}")
    if feature_sums.shape[0] != k:
        raise ValueError(f"feature_sums has K={feature_sums.shape[0]} rows but counts has K={k}")
    check_finite(feature_sums, "feature_sums")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(feature_sums.shape):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have the shape of feature_sums {tuple(feature_sums.shape)}, got {shape}")
    if objective.num_classes not in (None, k):
        raise ValueError(f"the objective has K={objective.num_classes} classes but counts has K={k}")
    _check_head(weight, bias, k, feature_sums.shape[1])
    if settings.include_bias and bias is None:
        raise ValueError("include_bias=True needs a bias (the head has none)")
    return k


def _check_confusion(confusion: object, k: int) -> torch.Tensor:
    confusion = check_square(confusion, "confusion")
    if confusion.shape[0] != k or not confusion.is_floating_point():
        raise ValueError(f"confusion must be a floating-point [{k}, {k}] matrix like counts, got "
                         f"{confusion.dtype} {tuple(confusion.shape)}")
    check_finite(confusion, "confusion")
    check_nonnegative(confusion, "confusion")
    if abs(float(confusion.sum()) - 1.0) > 1e-9:
        raise ValueError(f"confusion must sum to 1 (a joint confusion matrix), sums to {float(confusion.sum()):.12g}")
    return confusion


def selmix_refresh(counts: torch.Tensor, feature_sums: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, objective: Objective, settings: RefreshSettings,
                   confusion: torch.Tensor | None = None) -> Refresh:
    """One refresh: C, prototypes, multipliers, Ψ, G and P.

    Args:
        counts: int64 [K, K] validation confusion counts (rows: true class).
        feature_sums: float [K, d] sum of the validation features of each true class; the prototypes are
            feature_sums / class count (a class without validation sample gets a zero prototype).
        weight, bias: the head, [K, d] and [K] (bias None for a head without one).
        objective: its multipliers are updated in place from C (they are its state).
        settings: ``RefreshSettings``.
        confusion: float64 [K, K] joint confusion (entries ≥ 0, summing to 1) that the multipliers, Ψ and G see
            instead of counts / counts.sum(): the soft confusion (docs/method.md §2.5). The class supports
            and prototypes still come from ``counts``.

    Computes on ``weight.device``; returns tensors on that device.
    """
    k = _check_statistics(counts, feature_sums, weight, bias, objective, settings)
    device, variant = weight.device, settings.gain_variant
    counts = counts.detach().to(device)
    support = counts.sum(dim=1)
    total = int(support.sum())
    if total == 0:
        raise ValueError("counts is all zero; a joint confusion matrix needs at least one sample")
    present = support > 0
    prototypes = feature_sums.detach().to(device=device, dtype=torch.float64) / support.clamp_min(1).unsqueeze(1)
    joint = (counts.to(torch.float64).div_(total) if confusion is None  # exact: the counts' sum is an integer < 2⁵³
             else _check_confusion(confusion, k).to(device=device, dtype=torch.float64))
    clipped = joint.clamp_min(CLAMP_MIN) if variant == "official" or not settings.uniform else None
    objective._update_from(clipped if variant == "official" else joint, present, variant)
    if settings.uniform:
        gain = torch.zeros(k, k, dtype=torch.float64, device=device)
        return Refresh(joint, prototypes, None, gain, torch.full_like(gain, 1.0 / k**2), math.inf)
    with torch.no_grad():
        psi = objective._gradient_from(joint, clipped, present, variant)
    lam, block_size = _check_options(k, variant, settings.prior, "gemm", settings.include_bias, bias is not None,
                                     settings.mixup_mean, torch.float64, None)
    gain = _gain_from_clipped(prototypes, weight, bias, clipped, psi, variant=variant,
                              include_bias=settings.include_bias, prior=settings.prior, lam=lam,
                              dtype=torch.float64, block_size=block_size, method="gemm")
    eps = objective.release_eps if variant == "official" and objective.release_eps is not None else settings.eps
    distribution, temperature = _distribution(gain, settings.temperature, eps, settings.positive_only,
                                              settings.temperature_rule, settings.target_support)
    return Refresh(joint, prototypes, psi, gain, distribution, temperature)
