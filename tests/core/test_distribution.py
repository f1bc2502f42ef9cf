from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

from selmix_dist.core.distribution import (
    SUPPORT_RTOL,
    GainConvergence,
    distribution_and_temperature,
    distribution_entropy,
    effective_support,
    restrict_support,
    selmix_distribution,
)


def _reference(G: np.ndarray, temperature: float, eps: float) -> np.ndarray:
    sigma = softmax(G / temperature)  # scipy: no axis = jointly over all entries, as the release
    p = sigma * (G > 0) + eps
    return p / p.sum()


@pytest.mark.parametrize("temperature,eps", [(0.1, 1e-8), (1.0, 0.0), (0.01, 1e-3)])
def test_distribution_matches_reference(temperature: float, eps: float) -> None:
    G = np.random.default_rng(0).normal(size=(9, 9)) * 0.3
    P = selmix_distribution(torch.from_numpy(G), temperature=temperature, eps=eps)
    assert P.dtype == torch.float64 and P.shape == (9, 9)
    assert bool((P >= 0).all()) and float(P.sum()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(P.numpy(), _reference(G, temperature, eps), rtol=1e-10, atol=1e-300)
    if eps == 0:
        assert bool((P[torch.from_numpy(G) <= 0] == 0).all())


def test_relative_temperature_is_scale_free() -> None:
    G = np.random.default_rng(1).normal(size=(6, 6))
    P, t = distribution_and_temperature(torch.from_numpy(G), temperature=0.2, rule="relative")
    assert t == pytest.approx(0.2 * np.abs(G).max(), rel=1e-15)
    # T·max|G| by hand, through the scipy reference
    np.testing.assert_allclose(P.numpy(), _reference(G, 0.2 * np.abs(G).max(), 1e-8), rtol=1e-10)
    for scale in (1e-3, 50.0):  # gains scale with squared feature norms; P must not
        scaled = selmix_distribution(torch.from_numpy(G * scale), temperature=0.2, rule="relative")
        np.testing.assert_allclose(scaled.numpy(), P.numpy(), rtol=1e-9)
    absolute = selmix_distribution(torch.from_numpy(G * 50.0), temperature=0.2)
    assert float(absolute.max()) > 0.99 > float(P.max())  # the absolute T collapses onto one pair


def _restricted_support(G: np.ndarray, temperature: float, positive_only: bool) -> float:
    """exp(H) of softmax(G / T) restricted to the allowed pairs, by scipy."""
    allowed = G[G > 0] if positive_only else G.ravel()
    return float(np.exp(entropy(softmax(allowed / temperature))))


def _random_gain(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, k)) * rng.uniform(0.01, 100.0)  # any scale: the rule must not care


@pytest.mark.parametrize("k", [3, 20, 200])
@pytest.mark.parametrize("positive_only", [True, False])
def test_support_rule_reaches_its_target(k: int, positive_only: bool) -> None:
    G = _random_gain(k, seed=k)
    allowed = int((G > 0).sum()) if positive_only else k * k
    for target_support in (0.5, 1.0, 4.0, float(k)):
        P, t = distribution_and_temperature(torch.from_numpy(G), eps=1e-8, positive_only=positive_only,
                                            rule="support", target_support=target_support)
        target = min(max(target_support * k, 1.0), allowed)
        got = _restricted_support(G, t, positive_only)
        assert abs(got - target) <= SUPPORT_RTOL * target, (target_support, got, target)
        # P is the release's formula at the solved T
        expected = _reference(G, t, 1e-8) if positive_only else _plain_reference(G, t, 1e-8)
        np.testing.assert_allclose(P.numpy(), expected, rtol=1e-10, atol=1e-300)


def _plain_reference(G: np.ndarray, temperature: float, eps: float) -> np.ndarray:
    p = softmax(G / temperature) + eps
    return p / p.sum()


def test_support_rule_is_monotone_and_scale_free() -> None:
    G = _random_gain(30, seed=4)
    temperatures = [distribution_and_temperature(torch.from_numpy(G), rule="support", target_support=s)[1]
                    for s in (0.2, 0.5, 1.0, 2.0, 5.0)]
    assert temperatures == sorted(temperatures) and len(set(temperatures)) == len(temperatures)
    # the quantity solved for grows with T (checked independently, by scipy, on a grid of T)
    supports = [_restricted_support(G, t, True) for t in np.geomspace(1e-3, 1e3, 25) * np.abs(G).max()]
    assert all(b >= a for a, b in zip(supports, supports[1:], strict=False))
    P, t = distribution_and_temperature(torch.from_numpy(G), rule="support", target_support=2.0)
    for scale in (1e-4, 3.7, 1e5):
        P_scaled, t_scaled = distribution_and_temperature(torch.from_numpy(G * scale), rule="support",
                                                          target_support=2.0)
        np.testing.assert_allclose(P_scaled.numpy(), P.numpy(), rtol=1e-8)
        assert t_scaled == pytest.approx(t * scale, rel=1e-8)


def test_support_rule_limits() -> None:
    # two pairs tie at the maximum: fewer than 2 effective pairs is out of reach, T goes to its T → 0 limit
    G = np.array([[2.0, 2.0, 0.5], [1.0, -1.0, 0.3], [0.2, -3.0, 1.5]])
    P, t = distribution_and_temperature(torch.from_numpy(G), eps=0.0, rule="support", target_support=0.1)
    assert t == pytest.approx((2.0 - 0.2) * np.exp(-50), rel=1e-12)
    np.testing.assert_allclose(P.numpy()[0, :2], [0.5, 0.5], rtol=1e-15)
    # a target above the allowed pairs is capped at them: T large enough that P is ~uniform over them
    P, t = distribution_and_temperature(torch.from_numpy(G), eps=0.0, rule="support", target_support=10.0)
    assert _restricted_support(G, t, True) >= 7 * (1 - SUPPORT_RTOL)
    # all allowed gains equal: every T gives the same shape; T = inf, P uniform over them before ε
    G = np.array([[1.0, -1.0], [1.0, 1.0]])
    P, t = distribution_and_temperature(torch.from_numpy(G), eps=0.0, rule="support")
    assert t == float("inf")
    np.testing.assert_allclose(P.numpy(), [[1 / 3, 0.0], [1 / 3, 1 / 3]], rtol=1e-15)


def test_entropy_and_effective_support_match_scipy() -> None:
    P = torch.from_numpy(np.random.default_rng(2).dirichlet(np.full(16, 0.3)).reshape(4, 4))
    P[0, 0] = 0.0  # 0·log 0 = 0
    P /= P.sum()
    assert distribution_entropy(P) == pytest.approx(float(entropy(P.numpy().ravel())), rel=1e-12)
    assert effective_support(P) == pytest.approx(float(np.exp(entropy(P.numpy().ravel()))), rel=1e-12)
    assert effective_support(torch.full((3, 3), 1 / 9, dtype=torch.float64)) == pytest.approx(9.0, rel=1e-12)


def test_uniform_when_no_gain_is_positive() -> None:
    G = -torch.rand(5, 5, dtype=torch.float64)
    G[2, 3] = 0.0  # zero is not a positive gain
    for eps in (1e-8, 0.0):
        P = selmix_distribution(G, eps=eps)
        torch.testing.assert_close(P, torch.full((5, 5), 1 / 25, dtype=torch.float64), rtol=0, atol=1e-15)


def test_not_positive_only_is_plain_softmax() -> None:
    G = torch.tensor([[0.1, -0.2], [0.0, 0.3]], dtype=torch.float64)
    P = selmix_distribution(G, temperature=0.5, eps=0.0, positive_only=False)
    expected = softmax(G.numpy().ravel() / 0.5).reshape(2, 2)
    np.testing.assert_allclose(P.numpy(), expected, rtol=1e-12)


def test_large_gains_do_not_overflow() -> None:
    G = torch.tensor([[1e4, 2e4], [-1e4, 0.5]], dtype=torch.float64)
    P = selmix_distribution(G, temperature=0.01)
    assert bool(torch.isfinite(P).all())
    assert float(P[0, 1]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        selmix_distribution(torch.zeros(3, 3), temperature=temperature)


def test_bad_gain_raises() -> None:
    with pytest.raises(ValueError, match="G contains NaN"):
        selmix_distribution(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="G must be a square"):
        selmix_distribution(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="eps"):
        selmix_distribution(torch.zeros(2, 2), eps=-1.0)
    with pytest.raises(ValueError, match="rule must be one of"):
        selmix_distribution(torch.ones(2, 2), rule="adaptive")
    with pytest.raises(ValueError, match="target_support"):
        selmix_distribution(torch.ones(2, 2), rule="support", target_support=0.0)


def test_restrict_support_by_hand() -> None:
    P = torch.tensor([[0.1, 0.2, 0.3], [0.05, 0.05, 0.1], [0.1, 0.0, 0.1]], dtype=torch.float64)
    label_ok = torch.tensor([True, False, True])
    partner_ok = torch.tensor([True, True, False])
    out = restrict_support(P, label_ok, partner_ok)
    kept = 0.1 + 0.2 + 0.1 + 0.0
    expected = torch.tensor([[0.1, 0.2, 0], [0, 0, 0], [0.1, 0.0, 0]], dtype=torch.float64) / kept
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)
    # no mass on the allowed pairs: uniform over them
    P = torch.zeros(3, 3, dtype=torch.float64)
    P[1, 2] = 1.0
    out = restrict_support(P, label_ok, partner_ok)
    assert out[label_ok][:, partner_ok].flatten().tolist() == [0.25] * 4
    assert float(out.sum()) == 1.0
    with pytest.raises(ValueError, match="no allowed pair"):
        restrict_support(P, torch.zeros(3, dtype=torch.bool), partner_ok)


def test_gain_convergence_rule() -> None:
    conv = GainConvergence(window=3, rel_tol=0.05)
    # no sentinel: the first window-1 updates can never converge
    assert [conv.update(v) for v in (1.0, 1.0, 1.0)] == [False, False, True]
    conv = GainConvergence(window=3, rel_tol=0.05)
    results = [conv.update(v) for v in (1.0, 2.0, 3.0, 3.0, 3.1, 3.05)]
    # windows: [1,2,3] mean 2 vs 3 → no; [2,3,3] mean 8/3, |8/3−3| = 1/3 ≥ 0.133 → no;
    # [3,3,3.1] mean 3.0333, |diff| 0.0667 < 0.1517 → yes; [3,3.1,3.05] mean 3.05, diff 0 → yes
    assert results == [False, False, False, False, True, True]
    restored = GainConvergence()
    restored.load_state_dict(conv.state_dict())
    assert restored.history == conv.history and restored.window == 3
    assert restored.update(3.05) is True
    with pytest.raises(ValueError, match="max_gain"):
        conv.update(float("nan"))
    with pytest.raises(ValueError, match="window"):
        GainConvergence(window=0)
    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({"window": 3})
