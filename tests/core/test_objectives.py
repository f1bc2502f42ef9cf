from __future__ import annotations

import math

import pytest
import torch

from selmix_dist.core.confusion import head_tail_masks
from selmix_dist.core.gain import logit_derivative
from selmix_dist.core.metrics import compute_metrics
from selmix_dist.core.objectives import OBJECTIVES, CustomObjective, build_objective

K = 6
HEAD = torch.tensor([True, True, True, True, False, False])


def _random_joint(seed: int, k: int = K) -> torch.Tensor:
    """Strictly positive joint C with unbalanced rows and uneven columns (coverage constraints bind)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(k, k, generator=g, dtype=torch.float64) + 3 * torch.eye(k, dtype=torch.float64)
    c[:, 0] += 2.0  # class 0 over-predicted, so others fall below the α/K coverage target
    c *= torch.rand(k, 1, generator=g, dtype=torch.float64) + 0.2
    return c / c.sum()


def _objective(name: str, **params):
    return build_objective(name, K, head=HEAD, **params)


CASES = [(name, "closed_form") for name in sorted(OBJECTIVES)] + [
    (name, "dual") for name in sorted(OBJECTIVES) if "coverage" in name
]


@pytest.mark.parametrize("name,update", CASES)
def test_gradient_equals_autograd(name: str, update: str) -> None:
    is_coverage = "coverage" in name
    obj = _objective(name, **({"update": update, "omega": 30.0} if is_coverage else {}))
    for seed in range(3):
        C = _random_joint(seed)
        obj.update_multipliers(C)
        if is_coverage:  # the constraint is active, so the coverage term and normaliser are exercised
            assert max(float(v.max()) for v in obj.multipliers().values()) > 0
        c = C.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(obj.psi(c), c)
        closed = obj.gradient(C)
        assert closed.dtype == torch.float64 and closed.shape == (K, K)
        torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)


def test_psi_matches_the_metric_it_targets() -> None:
    # psi is evaluated at Ĉ = clamp(C, 1e-7): within ~1e-6 of the metric of C, also with an empty class
    counts = torch.tensor([[50, 3, 2, 0], [4, 30, 6, 1], [0, 0, 0, 0], [5, 5, 5, 40]])
    C = counts.double() / counts.sum()
    metrics = compute_metrics(counts)
    for name in ("mean_recall", "h_mean", "g_mean"):
        assert float(build_objective(name, 4).psi(C)) == pytest.approx(metrics[name], abs=1e-5), name
    # the empty class (row 2) has no weight: its row of Ψ is zero
    assert torch.all(build_objective("h_mean", 4).gradient(C)[2] == 0)


def test_release_gradients_for_balanced_validation() -> None:
    """For ρ_i = 1/K the exact Ψ gives the release's D (Ψ = I for mean recall, K·diag(λ) for min recall)
    and equals the release's own Ψ for G-mean and H-mean (method spec §2.4)."""
    C = _random_joint(7)
    C = C / C.sum(dim=1, keepdim=True) / K  # balanced rows
    eye = torch.eye(K, dtype=torch.float64)
    d_ours = logit_derivative(C, build_objective("mean_recall", K).gradient(C))
    torch.testing.assert_close(d_ours, logit_derivative(C, eye), rtol=1e-12, atol=1e-15)
    obj = build_objective("min_recall", K)
    obj.update_multipliers(C)
    lam = obj.multipliers()["lambda"]
    torch.testing.assert_close(
        logit_derivative(C, obj.gradient(C)), logit_derivative(C, K * torch.diag(lam)), rtol=1e-12, atol=1e-15
    )
    r = C.diagonal() / C.sum(dim=1)
    rho = C.sum(dim=1)
    gm = math.exp(sum(math.log(x) for x in r.tolist()) / K)
    hm = K / sum(1 / x for x in r.tolist())
    for name, release in (
        ("g_mean", lambda i, j: gm / K * ((i == j) / C[i, i] - 1 / rho[i])),
        ("h_mean", lambda i, j: hm**2 / K * ((i == j) * rho[i] / C[i, i] ** 2 - 1 / C[i, i])),
    ):
        expected = torch.tensor(
            [[float(release(i, j)) for j in range(K)] for i in range(K)], dtype=torch.float64
        )
        torch.testing.assert_close(build_objective(name, K).gradient(C), expected, rtol=1e-10, atol=1e-12)


# ---- multiplier updates, worked out by hand from the formulas of method spec §2.3 --------------------
COUNTS = torch.tensor([[8.0, 2.0, 0.0], [1.0, 6.0, 3.0], [0.0, 5.0, 5.0]], dtype=torch.float64)
C3 = COUNTS / COUNTS.sum()  # recalls 0.8, 0.6, 0.5; coverages 9/30, 13/30, 8/30


def _softmin(values: list[float], omega: float, prior: list[float] | None = None) -> list[float]:
    """normalise(prior_i · exp(−ω v_i)); no prior = the β = 0 (memoryless) update."""
    prior = prior or [1.0] * len(values)
    weights = [p * math.exp(-omega * v) for v, p in zip(values, prior, strict=True)]
    return [w / sum(weights) for w in weights]


def test_min_recall_multipliers_by_hand() -> None:
    obj = build_objective("min_recall", 3)
    assert obj.multipliers()["lambda"].tolist() == pytest.approx([1 / 3] * 3)
    obj.update_multipliers(C3)
    first = _softmin([0.8, 0.6, 0.5], 50.0)
    assert obj.multipliers()["lambda"].tolist() == pytest.approx(first, rel=1e-12)
    # β = 1: λ ← λ · exp(−ω r), normalised (exponentiated gradient), starting from 1/K
    obj = build_objective("min_recall", 3, beta=1.0, omega=2.0)
    obj.update_multipliers(C3)
    step1 = _softmin([0.8, 0.6, 0.5], 2.0, [1 / 3] * 3)
    obj.update_multipliers(C3)
    step2 = _softmin([0.8, 0.6, 0.5], 2.0, step1)
    assert obj.multipliers()["lambda"].tolist() == pytest.approx(step2, rel=1e-12)
    # ψ is the Lagrangian Σ λ_i r_i
    assert float(obj.psi(C3)) == pytest.approx(
        sum(l * r for l, r in zip(step2, [0.8, 0.6, 0.5], strict=True)), rel=1e-6
    )


def test_min_recall_ignores_empty_classes() -> None:
    counts = COUNTS.clone()
    counts[1] = 0.0  # class 1 has no validation sample
    obj = build_objective("min_recall", 3, omega=10.0)
    obj.update_multipliers(counts / counts.sum())
    expected = _softmin([0.8, 0.5], 10.0)
    assert obj.multipliers()["lambda"].tolist() == pytest.approx([expected[0], 0.0, expected[1]], rel=1e-12)


def test_min_head_tail_recall_multipliers_by_hand() -> None:
    obj = build_objective("min_head_tail_recall", 3, head=torch.tensor([True, True, False]))
    obj.update_multipliers(C3)
    lam_h, lam_t = _softmin([(0.8 + 0.6) / 2, 0.5], 50.0)
    m = obj.multipliers()
    assert float(m["lambda_head"]) == pytest.approx(lam_h, rel=1e-12)
    assert float(m["lambda_tail"]) == pytest.approx(lam_t, rel=1e-12)
    assert float(obj.psi(C3)) == pytest.approx(lam_h * 0.7 + lam_t * 0.5, rel=1e-6)


def _closed_form(violation: float, lam_max: float, tau: float) -> float:
    return max(0.0, lam_max * (1 - math.exp(-violation / tau)))


def test_coverage_multipliers_closed_form_by_hand() -> None:
    obj = build_objective("mean_recall_min_coverage", 3)  # α = 0.95, τ = 0.01, λ_max = 100
    obj.update_multipliers(C3)
    cov = [9 / 30, 13 / 30, 8 / 30]
    lam = [_closed_form(0.95 / 3 - c, 100.0, 0.01) for c in cov]
    assert lam[1] == 0.0 and lam[0] > 0 and lam[2] > 0
    assert obj.multipliers()["lambda"].tolist() == pytest.approx(lam, rel=1e-12)
    # ψ = (mean recall + Σ λ_j cov_j) / (1 + max λ)
    expected = ((0.8 + 0.6 + 0.5) / 3 + sum(l * c for l, c in zip(lam, cov, strict=True))) / (1 + max(lam))
    assert float(obj.psi(C3)) == pytest.approx(expected, rel=1e-6)


def test_coverage_multipliers_dual_by_hand() -> None:
    obj = build_objective("h_mean_min_coverage", 3, update="dual", omega=200.0, lambda_max=10.0)
    cov = [9 / 30, 13 / 30, 8 / 30]
    lam = [0.0, 0.0, 0.0]
    for _ in range(3):  # λ ← clip(λ − ω (cov − α/K), 0, λ_max), accumulated
        obj.update_multipliers(C3)
        lam = [min(10.0, max(0.0, l - 200.0 * (c - 0.95 / 3))) for l, c in zip(lam, cov, strict=True)]
        assert obj.multipliers()["lambda"].tolist() == pytest.approx(lam, rel=1e-12)
    assert lam[2] == 10.0  # the clip at λ_max was exercised


def test_head_tail_coverage_multipliers_by_hand() -> None:
    head = torch.tensor([True, False, True])
    cov_h = (9 / 30 + 8 / 30) / 2  # tail coverage 13/30 > α/K: λ_t = 0
    for name in ("mean_recall_min_head_tail_coverage", "h_mean_min_head_tail_coverage"):
        obj = build_objective(name, 3, head=head, tau=0.05, lambda_max=20.0)
        obj.update_multipliers(C3)
        lam_h = _closed_form(0.95 / 3 - cov_h, 20.0, 0.05)
        m = obj.multipliers()
        assert float(m["lambda_head"]) == pytest.approx(lam_h, rel=1e-12) and lam_h > 0
        assert float(m["lambda_tail"]) == 0.0
        # per-class λ_j = λ_h/|H| on head columns; normaliser 1 + max(λ_h, λ_t) for both base metrics
        r = [0.8, 0.6, 0.5]
        base = sum(r) / 3 if name.startswith("mean") else 3 / sum(1 / x for x in r)
        expected = (base + lam_h / 2 * (9 / 30 + 8 / 30)) / (1 + lam_h)
        assert float(obj.psi(C3)) == pytest.approx(expected, rel=1e-6)


# ---- state, registry, custom objectives, errors ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_state_dict_round_trip(name: str) -> None:
    obj = _objective(name)
    obj.update_multipliers(_random_joint(1))
    other = _objective(name)
    other.load_state_dict(obj.state_dict())
    C = _random_joint(2)
    torch.testing.assert_close(other.gradient(C), obj.gradient(C), rtol=0, atol=0)
    with pytest.raises(ValueError, match="K=6"):
        build_objective(name, 5, head=HEAD[:5]).load_state_dict(obj.state_dict())
    state = obj.state_dict()
    state["multipliers"] = {"bogus": torch.zeros(K)}
    with pytest.raises(ValueError, match="multipliers"):
        other.load_state_dict(state)


def test_state_dict_rejects_wrong_name_and_params() -> None:
    state = build_objective("mean_recall", K).state_dict()
    with pytest.raises(ValueError, match="'mean_recall', not 'h_mean'"):
        build_objective("h_mean", K).load_state_dict(state)
    state = build_objective("min_recall", K).state_dict()
    state["params"]["omega"] = -1.0
    with pytest.raises(ValueError, match="'omega'"):
        build_objective("min_recall", K).load_state_dict(state)


def test_registry_errors_and_aliases() -> None:
    with pytest.raises(ValueError, match="unknown objective 'mean_recal'; did you mean 'mean_recall'"):
        build_objective("mean_recal", K)
    with pytest.raises(ValueError, match="no parameter"):
        build_objective("mean_recall", K, omega=3.0)
    with pytest.raises(ValueError, match="needs a head mask"):
        build_objective("min_head_tail_recall", K)
    with pytest.raises(ValueError, match="'tau'"):
        build_objective("mean_recall_min_coverage", K, tau=0.0)
    with pytest.raises(ValueError, match="'update'"):
        build_objective("mean_recall_min_coverage", K, update="adam")
    assert build_objective("HM_min_coverage", K).name == "h_mean_min_coverage"
    assert build_objective("min_HT_recall", K, head=HEAD).name == "min_head_tail_recall"


def test_bad_confusion_raises() -> None:
    obj = build_objective("mean_recall", 3)
    with pytest.raises(ValueError, match="square"):
        obj.gradient(torch.rand(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="K=4 classes but 3"):
        obj.gradient(torch.rand(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="negative"):
        obj.update_multipliers(-torch.rand(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        obj.psi(torch.full((3, 3), float("nan"), dtype=torch.float64))


def test_custom_objective_autograd() -> None:
    C = _random_joint(3)
    custom = CustomObjective(lambda c: (c**2).sum() + c[0, 1] * c[2, 2], name="quad", num_classes=K)
    expected = 2 * C
    expected[0, 1] += C[2, 2]
    expected[2, 2] += C[0, 1]
    torch.testing.assert_close(custom.gradient(C), expected, rtol=1e-14, atol=0)
    assert float(custom.psi(C)) == pytest.approx(float((C**2).sum() + C[0, 1] * C[2, 2]))
    custom.update_multipliers(C)  # no multipliers: a no-op
    assert custom.multipliers() == {}
    with pytest.raises(ValueError, match="scalar"):
        CustomObjective(lambda c: c.sum(dim=0)).psi(C)
    with pytest.raises(ValueError, match="non-finite gradient"):
        CustomObjective(lambda c: torch.sqrt(c - c[0, 0]).sum()).gradient(C)


# ---- the release's Ψ (variant "official"), brute force from method spec §2.3–§2.4 ------------------
def _release_psi(name: str, C: list[list[float]], mult: dict[str, torch.Tensor]) -> list[list[float]]:
    """Ψ as the spec describes the release, on index-sorted classes (head: i < int(0.9K) for the means)."""
    k = len(C)
    ch = [[max(x, 1e-7) for x in row] for row in C]
    rho = [sum(row) for row in ch]
    raw_r = [C[i][i] / sum(C[i]) for i in range(k)]
    clipped_r = [ch[i][i] / rho[i] for i in range(k)]

    def spread(lam_h: float, lam_t: float) -> list[float]:  # λ_h/(0.9K) for i < 0.9K, λ_t/(0.1K) otherwise
        return [lam_h / (0.9 * k) if i < 0.9 * k else lam_t / (0.1 * k) for i in range(k)]

    def mean(x):
        return sum(x) / len(x)

    psi = [[0.0] * k for _ in range(k)]
    if name in ("mean_recall", "mean_recall_min_coverage", "mean_recall_min_head_tail_coverage"):
        psi = [[float(i == j) for j in range(k)] for i in range(k)]  # Ψ = I
    elif name == "min_recall":
        lam = mult["lambda"].tolist()
        psi = [[k * lam[i] * (i == j) for j in range(k)] for i in range(k)]  # Ψ = K·diag(λ)
    elif name == "min_head_tail_recall":
        lam = spread(float(mult["lambda_head"]), float(mult["lambda_tail"]))
        psi = [[k * lam[i] * (i == j) for j in range(k)] for i in range(k)]
    elif name == "g_mean":
        gm = math.exp(mean([math.log(x) for x in raw_r])) if min(raw_r) > 0 else 0.0
        psi = [[gm / k * ((i == j) / ch[i][i] - 1 / rho[i]) for j in range(k)] for i in range(k)]
    else:  # the H-means: HM of the raw matrix, of the clipped one for the head/tail coverage variant
        r = clipped_r if name == "h_mean_min_head_tail_coverage" else raw_r
        hm = k / sum(1 / x for x in r) if min(r) > 0 else 0.0
        psi = [[hm**2 / k * ((i == j) * rho[i] / ch[i][i] ** 2 - 1 / ch[i][i]) for j in range(k)] for i in range(k)]
    if "coverage" in name:
        if "head_tail" in name:
            lam_h, lam_t = float(mult["lambda_head"]), float(mult["lambda_tail"])
            lam = spread(lam_h, lam_t)
            norm = 1 + (max(lam) if name.startswith("h_mean") else max(lam_h, lam_t))
        else:
            lam = mult["lambda"].tolist()
            norm = 1 + max(lam)
        psi = [[(psi[i][j] + lam[j]) / norm for j in range(k)] for i in range(k)]
    return psi


def _release_case(k: int, seed: int, zero_recall: bool) -> torch.Tensor:
    """Unbalanced validation rows, zero entries (clipped to 1e-7), class 0 over-predicted (coverage binds)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (k, k), generator=g).double() + 6 * torch.eye(k, dtype=torch.float64)
    counts[:, 0] += 5
    counts *= torch.randint(1, 4, (k, 1), generator=g)  # row sums differ: ρ_i ≠ 1/K
    if zero_recall:
        counts[k - 1, k - 1] = 0.0  # a tail class never recognised
    return counts / counts.sum()


@pytest.mark.parametrize("k", [15, 20])  # 0.9K = 13.5 (the λ spread covers one class more) and 18
@pytest.mark.parametrize("zero_recall", [False, True])
def test_official_gradient_is_the_release_psi(k: int, zero_recall: bool) -> None:
    C = _release_case(k, seed=k, zero_recall=zero_recall)
    head, _ = head_tail_masks(torch.arange(k, 0, -1), head_fraction=0.9)  # index-sorted: the first int(0.9K)
    assert head.tolist() == [i < int(0.9 * k) for i in range(k)]
    for name in sorted(OBJECTIVES):
        obj = build_objective(name, k, head=head, head_fraction=0.9)
        obj.update_multipliers(C)
        mult = obj.multipliers()
        if name == "min_head_tail_recall":  # §2.3: softmax(−ω [r̄_H, r̄_T]), means over [:int(0.9K)] and the rest
            r, n_head = (C.diagonal() / C.sum(dim=1)).tolist(), int(0.9 * k)
            means = [sum(r[:n_head]) / n_head, sum(r[n_head:]) / (k - n_head)]
            assert [float(mult["lambda_head"]), float(mult["lambda_tail"])] == pytest.approx(_softmin(means, 50.0))
        expected = torch.tensor(_release_psi(name, C.tolist(), mult), dtype=torch.float64)
        official = obj.gradient(C, variant="official")
        scale = float(expected.abs().max())
        torch.testing.assert_close(official, expected, rtol=1e-10, atol=1e-12 * scale, msg=name)
        exact = obj.gradient(C)
        if name not in ("h_mean", "g_mean", "h_mean_min_coverage") or zero_recall:
            # the release's choices matter here (for the plain H/G-mean only through a zero raw recall)
            assert float((official - exact).abs().max()) > 1e-3 * float(exact.abs().max()), name


def test_official_h_and_g_mean_collapse_on_a_zero_recall() -> None:
    """§2.4: a raw recall of 0 makes HM = GM = 0 and Ψ ≡ 0 in the release; ours is evaluated at Ĉ."""
    C = _release_case(10, seed=3, zero_recall=True)
    for name in ("h_mean", "g_mean"):
        obj = build_objective(name, 10)
        assert torch.equal(obj.gradient(C, variant="official"), torch.zeros(10, 10, dtype=torch.float64))
        assert float(obj.gradient(C).abs().max()) > 0


def test_official_head_tail_spread_needs_a_consistent_head_fraction() -> None:
    C = _release_case(15, seed=1, zero_recall=False)
    head, _ = head_tail_masks(torch.arange(15, 0, -1), head_fraction=0.8)  # 12 head classes
    for name in ("min_head_tail_recall", "mean_recall_min_head_tail_coverage"):
        obj = build_objective(name, 15, head=head)  # head_fraction 0.9 would mean 13 head classes
        obj.update_multipliers(C)
        with pytest.raises(ValueError, match=r"head has 12 classes but head_fraction=0.9 gives floor\(0.9·15\)"):
            obj.gradient(C, variant="official")
        obj.gradient(C)  # the exact variant does not use the fraction
        fitting = build_objective(name, 15, head=head, head_fraction=0.8)
        fitting.update_multipliers(C)
        lam = fitting._release_head_tail_spread(*torch.tensor([0.3, 0.7], dtype=torch.float64))
        # 0.8·15 = 12 is an integer: the spread covers exactly the head
        assert lam.tolist() == pytest.approx([0.3 / 12] * 12 + [0.7 / 3] * 3, rel=1e-12)
    with pytest.raises(ValueError, match="variant must be one of"):
        build_objective("mean_recall", 3).gradient(C3, variant="paper")
    with pytest.raises(ValueError, match="head_fraction must be a number in"):
        build_objective("mean_recall", 3, head_fraction=1.5)
