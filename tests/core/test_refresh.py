from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

from selmix_dist.core import (
    OBJECTIVES,
    CustomObjective,
    RefreshSettings,
    build_objective,
    confusion_counts,
    gain_matrix,
    joint_confusion,
    selmix_distribution,
    selmix_refresh,
    update_objective,
)

K, D = 7, 5


def _head(k: int = K) -> torch.Tensor:
    head = torch.zeros(k, dtype=torch.bool)
    head[: (9 * k) // 10] = True
    return head


def _statistics(seed: int, k: int = K, d: int = D):
    """Validation counts int64[K, K] and feature sums float64[K, d] of a random labelled set, with the
    features themselves (for the prototypes by hand) and a random head (W, b)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (40 * k,), generator=g)
    labels[:k] = torch.arange(k)  # every class present
    feats = torch.randn(len(labels), d, generator=g, dtype=torch.float64) + labels.unsqueeze(1) * 0.3
    preds = torch.where(torch.rand(len(labels), generator=g) < 0.6, labels, torch.randint(0, k, labels.shape,
                                                                                         generator=g))
    sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, labels, feats)
    w = torch.randn(k, d, generator=g)
    b = 0.3 * torch.randn(k, generator=g)
    return confusion_counts(labels, preds, k), sums, feats, labels, w, b


SETTINGS = [
    RefreshSettings(),
    RefreshSettings(temperature=0.5, temperature_rule="relative", gain_variant="official", include_bias=True),
    RefreshSettings(temperature_rule="support", target_support=2.0, prior="empirical", positive_only=False,
                    eps=0.0, mixup_min=0.2),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["release", "relative-official-bias", "support-empirical"])
def test_refresh_equals_the_step_by_step_sequence(settings: RefreshSettings) -> None:
    counts, sums, feats, labels, w, b = _statistics(seed=1)
    for name in sorted(OBJECTIVES):
        ours, theirs = build_objective(name, K, head=_head()), build_objective(name, K, head=_head())
        for _ in range(2):  # twice: the multipliers carry over between refreshes (β, dual updates)
            out = selmix_refresh(counts, sums, w, b, ours, settings)
            joint = counts.double() / counts.sum()
            prototypes = torch.stack([feats[labels == c].mean(dim=0) for c in range(K)])
            theirs.update_multipliers(joint, variant=settings.gain_variant)
            psi = theirs.gradient(joint, variant=settings.gain_variant)
            gain = gain_matrix(prototypes, w.double(), b.double(), joint, psi, variant=settings.gain_variant,
                               include_bias=settings.include_bias, prior=settings.prior,
                               mixup_mean=(settings.mixup_min + 1) / 2)
            official_eps = settings.gain_variant == "official" and theirs.release_eps is not None
            P = selmix_distribution(gain, temperature=settings.temperature,
                                    eps=theirs.release_eps if official_eps else settings.eps,
                                    positive_only=settings.positive_only, rule=settings.temperature_rule,
                                    target_support=settings.target_support)
            torch.testing.assert_close(out.joint, joint, rtol=1e-15, atol=0)
            torch.testing.assert_close(out.prototypes, prototypes, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(out.psi, psi, rtol=1e-12, atol=0)
            torch.testing.assert_close(out.gain, gain, rtol=1e-10, atol=1e-14 * float(gain.abs().max()))
            torch.testing.assert_close(out.distribution, P, rtol=1e-9, atol=1e-300)
            for key, value in theirs.multipliers().items():
                torch.testing.assert_close(ours.multipliers()[key], value, rtol=0, atol=0)
        assert all(x.dtype == torch.float64 for x in (out.joint, out.prototypes, out.psi, out.gain, out.distribution))
        assert out.max_gain == pytest.approx(float(gain.max()), rel=1e-10)


@pytest.mark.parametrize("name", ["min_recall", "h_mean", "h_mean_min_coverage"])
def test_a_soft_confusion_replaces_the_counts_in_the_multipliers_psi_and_gain_not_in_the_prototypes(name) -> None:
    """selmix_refresh(..., confusion=S) is the step-by-step sequence at C = S, with prototypes and supports from
    the hard counts; S = the counts' own joint gives the hard refresh exactly."""
    counts, sums, feats, labels, w, b = _statistics(seed=11)
    g = torch.Generator().manual_seed(12)
    soft = torch.rand(K, K, generator=g, dtype=torch.float64) + 3 * torch.eye(K, dtype=torch.float64)
    soft /= soft.sum()
    settings = RefreshSettings()
    ours, theirs = build_objective(name, K, head=_head()), build_objective(name, K, head=_head())
    out = selmix_refresh(counts, sums, w, b, ours, settings, confusion=soft)
    theirs.update_multipliers(soft)
    psi = theirs.gradient(soft)
    prototypes = torch.stack([feats[labels == c].mean(dim=0) for c in range(K)])
    gain = gain_matrix(prototypes, w.double(), b.double(), soft, psi, mixup_mean=(settings.mixup_min + 1) / 2)
    assert torch.equal(out.joint, soft)
    torch.testing.assert_close(out.prototypes, prototypes, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.psi, psi, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.gain, gain, rtol=1e-10, atol=1e-14 * float(gain.abs().max()))
    hard = selmix_refresh(counts, sums, w, b, build_objective(name, K, head=_head()), settings)
    same = selmix_refresh(counts, sums, w, b, build_objective(name, K, head=_head()), settings,
                          confusion=joint_confusion(counts))
    for field in ("joint", "psi", "gain", "distribution"):
        assert torch.equal(getattr(same, field), getattr(hard, field)), field
    assert not torch.equal(out.gain, hard.gain)


def test_refresh_reports_the_temperature_and_entropy_it_used() -> None:
    counts, sums, _, _, w, b = _statistics(seed=2)
    obj = build_objective("mean_recall", K)
    out = selmix_refresh(counts, sums, w, b, obj, RefreshSettings(temperature=0.3))
    assert out.temperature == 0.3
    out = selmix_refresh(counts, sums, w, b, obj, RefreshSettings(temperature=0.3, temperature_rule="relative"))
    assert out.temperature == pytest.approx(0.3 * float(out.gain.abs().max()), rel=1e-15)
    out = selmix_refresh(counts, sums, w, b, obj, RefreshSettings(eps=1e-6, temperature_rule="support"))
    # the release's formula (scipy softmax over all K² entries, masked, + ε) at the reported T
    G = out.gain.numpy()
    expected = softmax(G / out.temperature) * (G > 0) + 1e-6
    np.testing.assert_allclose(out.distribution.numpy(), expected / expected.sum(), rtol=1e-10)
    assert out.entropy == pytest.approx(float(entropy(out.distribution.numpy().ravel())), rel=1e-12)
    assert out.effective_support == pytest.approx(math.exp(out.entropy), rel=1e-15)


def test_uniform_refresh_updates_the_multipliers_and_ignores_the_gain() -> None:
    counts, sums, _, _, w, b = _statistics(seed=3)
    obj, reference = build_objective("min_recall", K), build_objective("min_recall", K)
    out = selmix_refresh(counts, sums, w, b, obj, RefreshSettings(uniform=True))
    reference.update_multipliers(joint_confusion(counts))
    torch.testing.assert_close(obj.multipliers()["lambda"], reference.multipliers()["lambda"], rtol=0, atol=0)
    assert out.psi is None and out.temperature == math.inf and out.max_gain == 0.0
    assert torch.equal(out.gain, torch.zeros(K, K, dtype=torch.float64))
    assert torch.equal(out.distribution, torch.full((K, K), 1 / K**2, dtype=torch.float64))
    assert out.effective_support == pytest.approx(K**2, rel=1e-12)


def test_absent_class_gets_a_zero_prototype_and_custom_objectives_work() -> None:
    counts, sums, _, _, w, b = _statistics(seed=4)
    counts[2] = 0  # class 2 has no validation sample
    sums[2] = 0.0
    custom = CustomObjective(lambda c: c.diagonal().sum(), name="accuracy", num_classes=K)
    out = selmix_refresh(counts, sums, w, b, custom, RefreshSettings())
    assert torch.equal(out.prototypes[2], torch.zeros(D, dtype=torch.float64))
    support = counts.sum(dim=1, keepdim=True).clamp_min(1).double()
    torch.testing.assert_close(out.prototypes, sums / support, rtol=1e-15, atol=0)
    torch.testing.assert_close(out.psi, torch.eye(K, dtype=torch.float64), rtol=0, atol=0)


def test_update_objective_is_the_first_half_of_a_refresh() -> None:
    counts = _statistics(seed=5)[0]
    obj, reference = build_objective("h_mean_min_coverage", K), build_objective("h_mean_min_coverage", K)
    joint = update_objective(counts, obj)
    reference.update_multipliers(counts.double() / counts.sum())
    torch.testing.assert_close(joint, counts.double() / counts.sum(), rtol=1e-15, atol=0)
    torch.testing.assert_close(obj.multipliers()["lambda"], reference.multipliers()["lambda"], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refresh_on_cuda_matches_cpu() -> None:
    counts, sums, _, _, w, b = _statistics(seed=6, k=30, d=16)
    settings = RefreshSettings(temperature_rule="support", gain_variant="official")
    cpu = selmix_refresh(counts, sums, w, b, build_objective("g_mean", 30), settings)
    gpu = selmix_refresh(counts, sums, w.cuda(), b.cuda(), build_objective("g_mean", 30), settings)
    for name in ("joint", "prototypes", "psi", "gain", "distribution"):
        assert getattr(gpu, name).device.type == "cuda", name
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-8, atol=1e-12)
    assert gpu.temperature == pytest.approx(cpu.temperature, rel=1e-8)


def test_refresh_rejects_bad_input() -> None:
    counts, sums, _, _, w, b = _statistics(seed=7)
    obj = build_objective("mean_recall", K)
    for args, match in (
        ((counts.double(), sums, w, b, obj), "counts must be an integer"),
        ((counts[:, :3], sums, w, b, obj), "counts must be a square"),
        ((counts, sums[:3], w, b, obj), "feature_sums has K=3 rows but counts has K=7"),
        ((counts, sums.long(), w, b, obj), "feature_sums must be a floating-point"),
        ((counts, sums * float("nan"), w, b, obj), "feature_sums contains NaN"),
        ((counts, sums, w[:, :2], b, obj), r"weight must have the shape of feature_sums \(7, 5\)"),
        ((counts, sums, w, b, build_objective("mean_recall", 4)), "objective has K=4 classes but counts has K=7"),
    ):
        with pytest.raises(ValueError, match=match):
            selmix_refresh(*args, RefreshSettings())
    joint = joint_confusion(counts)
    for confusion, match in ((joint[:3], "confusion must be a square"), (counts, "confusion must be a floating"),
                             (joint * 2, "confusion must sum to 1"), (-joint, "confusion has negative"),
                             (joint * float("nan"), "confusion contains NaN")):
        with pytest.raises(ValueError, match=match):
            selmix_refresh(counts, sums, w, b, obj, RefreshSettings(), confusion=confusion)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature_rule": "adaptive"}, "temperature_rule must be one of"),
        ({"target_support": -1.0}, "target_support must be > 0"),
        ({"eps": -1e-9}, "eps must be >= 0"),
        ({"positive_only": 1}, "positive_only must be a bool"),
        ({"gain_variant": "code"}, "gain_variant must be one of"),
        ({"prior": "uniform"}, "prior must be one of"),
        ({"mixup_min": 1.5}, r"mixup_min must be in \[0, 1\]"),
    ],
)
def test_settings_reject_bad_values(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"RefreshSettings.{match}"):
        RefreshSettings(**changes)

