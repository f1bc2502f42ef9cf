"""The post-hoc plug-in (core.plugin) against brute force over a weight grid at K ≤ 4, its direction against
autograd of the linearised soft metric, and its invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from selmix_dist.core import build_objective, compute_metrics, confusion_counts, head_tail_masks
from selmix_dist.core.plugin import _raise_uncovered, _soft_direction, coverage_floor, fit_plugin, plugin_score

OBJECTIVES = ["min_recall", "h_mean", "g_mean", "mean_recall", "min_head_tail_recall", "mean_recall_min_coverage",
              "h_mean_min_coverage", "mean_recall_min_head_tail_coverage"]
PER_CLASS = 40


def long_tailed_logits(seed: int, k: int, n: int = PER_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy logits that favour the first classes (as an uncorrected long-tailed head does)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(n)
    logits = 1.5 * torch.randn(k * n, k, generator=g)
    logits[torch.arange(k * n), labels] += 1.0
    return logits - torch.linspace(0.0, 1.5, k), labels


def grid_best(logits, labels, objective, head, grid) -> tuple[float, float]:
    """Best score over β ∈ {0} × grid^(K−1) (β_0 = 0: the rule is invariant to a common shift)."""
    k = logits.shape[1]
    best = None
    for rest in itertools.product(grid, repeat=k - 1):
        beta = torch.tensor([0.0, *rest], dtype=torch.float64)
        preds = (logits.double() + beta).argmax(dim=1)
        score = plugin_score(confusion_counts(labels, preds, k), objective, head)
        best = score if best is None or score > best else best
    return best


def setup(seed: int, k: int, name: str):
    logits, labels = long_tailed_logits(seed, k)
    head, _ = head_tail_masks(torch.arange(k, 0, -1), head_fraction=0.5)
    return logits, labels, build_objective(name, k, head=head), head


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_classes_reach_the_exhaustive_optimum(name, seed):
    # K = 2: one free weight, and the polish visits every flip point, so nothing on a fine grid is better.
    logits, labels, objective, head = setup(seed, 2, name)
    result = fit_plugin(logits, labels, objective, head=head, flip_points=10_000)
    best = grid_best(logits, labels, objective, head, torch.linspace(-6, 6, 401).tolist())
    assert result.score[0] >= best[0]
    assert result.score >= (best[0], best[1] - 1e-12)


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("k, seeds, points", [(3, (0, 1), 21), (4, (2,), 11)])
def test_three_and_four_classes_come_within_one_sample_of_the_grid_optimum(name, k, seeds, points):
    # Coordinate polish finds a coordinate-wise optimum; the grid's best is at most one validation sample of
    # one class better (a recall step of 1/40), and the constraint holds whenever the grid can meet it.
    for seed in seeds:
        logits, labels, objective, head = setup(seed, k, name)
        result = fit_plugin(logits, labels, objective, head=head)
        best = grid_best(logits, labels, objective, head, torch.linspace(-3, 3, points).tolist())
        assert result.score >= result.start_score
        assert result.score[0] >= best[0]
        if result.score[0] == best[0]:
            assert result.score[1] >= best[1] - 1.0 / PER_CLASS - 1e-12, (seed, result.score, best)


def test_the_result_is_what_the_weights_give_and_is_deterministic():
    logits, labels, objective, head = setup(0, 4, "h_mean")
    a = fit_plugin(logits, labels, objective, head=head)
    b = fit_plugin(logits, labels, objective, head=head)
    assert torch.equal(a.log_weights, b.log_weights)
    counts = confusion_counts(labels, (logits.double() + a.log_weights).argmax(dim=1), 4)
    assert compute_metrics(counts, head=head, coverage_alpha=0.95) == a.metrics
    assert plugin_score(counts, objective, head) == a.score
    assert abs(float(a.log_weights.sum())) < 1e-9          # centred: a common shift changes nothing


def test_the_callers_objective_is_not_changed():
    logits, labels, objective, head = setup(1, 3, "min_recall")
    before = objective.multipliers()
    fit_plugin(logits, labels, objective, head=head)
    after = objective.multipliers()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_direction_is_the_gradient_of_the_linearised_soft_metric():
    # d_j = ∂/∂β_j Σ_ab Ψ_ab C̃_ab(β), C̃_ab = (1/V) Σ_{y=a} softmax(s + β)_b, Ψ held fixed: autograd of that sum.
    logits, labels, objective, _ = setup(2, 4, "g_mean")
    g = torch.Generator().manual_seed(5)
    psi = torch.randn(4, 4, generator=g, dtype=torch.float64)
    beta = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)
    logits = logits.double()                     # float64 logits: the direction is then computed in float64
    p = torch.softmax(logits + beta, dim=1)
    soft = torch.zeros(4, 4, dtype=torch.float64).index_add(0, labels, p) / len(labels)
    (psi * soft).sum().backward()
    d = _soft_direction(logits, beta.detach(), labels, psi)
    torch.testing.assert_close(d, beta.grad, rtol=1e-12, atol=1e-14)


def test_blocked_direction_equals_one_block(monkeypatch):
    logits, labels, _, _ = setup(0, 4, "min_recall")
    psi = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    beta = torch.zeros(4, dtype=torch.float64)
    whole = _soft_direction(logits, beta, labels, psi)
    monkeypatch.setattr("selmix_dist.core.plugin._BLOCK_ENTRIES", 4 * 7)   # 7 rows a block, 23 blocks
    torch.testing.assert_close(_soft_direction(logits, beta, labels, psi), whole, rtol=1e-12, atol=1e-15)


def test_hand_case_min_recall_moves_the_boundary_to_the_tail_class():
    # Two classes, one feature: class 0 has logits gap +2 on its samples, class 1 only +0.5 below the boundary:
    # rows of class 1 score (0, −0.5 … +0.5); a weight β_1 > 0.5 recovers every class-1 row and loses none of
    # class 0 (their gap is 2), so min recall goes from 0.5 to 1.
    s1 = torch.tensor([[0.0, -0.5], [0.0, -0.25], [0.0, 0.25], [0.0, 0.5]])
    s0 = torch.tensor([[2.0, 0.0]] * 4)
    logits, labels = torch.cat([s0, s1]), torch.tensor([0] * 4 + [1] * 4)
    result = fit_plugin(logits, labels, build_objective("min_recall", 2))
    assert result.start_score == (0.0, 0.5)
    assert result.score == (0.0, 1.0)
    gap = float(result.log_weights[1] - result.log_weights[0])
    assert 0.5 < gap < 2.0


@pytest.mark.parametrize("name", OBJECTIVES)
def test_the_score_is_compute_metrics_target_and_the_constraints_shortfall(name):
    k = 6
    head = torch.tensor([True, True, True, True, False, False])
    objective = build_objective(name, k, head=head)
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        counts = torch.randint(0, 9, (k, k), generator=g)
        counts[trial % k] = 0                              # a class with no sample: left out of recall metrics
        counts.diagonal().add_(trial)                      # trial 0 has a zero recall: H-mean and G-mean are 0
        metrics = compute_metrics(counts, head=head, coverage_alpha=0.95)
        violation, target = plugin_score(counts, objective, head)
        assert target == pytest.approx(metrics[objective.target_metric], rel=1e-12, abs=1e-15)
        cov = counts.sum(dim=0).double() / counts.sum()
        t = 0.95 / k
        if "coverage_violation" in objective.constraint_metrics:
            expected = sum(max(0.0, t - float(c)) for c in cov)   # the total shortfall
        elif objective.constraint_metrics:                 # head / tail mean coverage
            expected = max(0.0, t - float(cov[head].mean()), t - float(cov[~head].mean()))
        else:
            expected = 0.0
        assert -violation == pytest.approx(expected, abs=1e-15)


def test_bad_inputs_are_named():
    objective = build_objective("min_recall", 3)
    with pytest.raises(ValueError, match="K=2 classes, the objective K=3"):
        fit_plugin(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64), objective)
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_plugin(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), objective)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_plugin(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.int64), objective)
    with pytest.raises(ValueError, match="needs the head mask"):
        fit_plugin(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64),
                   build_objective("min_head_tail_recall", 3, head=torch.tensor([True, False, False])))


def balanced_bias(logits: torch.Tensor, need: int, steps: int = 2000) -> torch.Tensor:
    """A β that gives every class at least ``need`` predictions, by a multiplicative balancing of the prediction
    counts (independent of fit_plugin's auction): evidence that the coverage constraint can be met."""
    k = logits.shape[1]
    beta = torch.zeros(k, dtype=torch.float64)
    for _ in range(steps):
        counts = torch.bincount((logits.double() + beta).argmax(dim=1), minlength=k)
        if int(counts.min()) >= need:
            return beta
        beta -= 0.05 * torch.log(counts.clamp_min(1).double() / (need + 1))
    raise AssertionError("the balancing did not meet the coverage target: the test's data is wrong")


@pytest.mark.parametrize("name", ["mean_recall_min_coverage", "h_mean_min_coverage"])
@pytest.mark.parametrize("seed", [0, 1])
def test_min_coverage_is_met_at_many_classes_where_a_balancing_shows_it_can_be(name, seed):
    # K = 200, 50 validation rows per class, target α/K: 48 predictions per class, 2 of slack. Many classes sit
    # one row short at once, which the coordinate polish alone never got over (it stopped at 46-47).
    k, n = 200, 50
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(n)
    logits = 1.5 * torch.randn(k * n, k, generator=g)
    logits[torch.arange(k * n), labels] += 1.0
    logits -= torch.linspace(0.0, 3.0, k)
    need = math.ceil(0.95 * n)
    balanced_bias(logits, need)
    result = fit_plugin(logits, labels, build_objective(name, k), iterations=10, polish_sweeps=0)
    counts = torch.bincount((logits.double() + result.log_weights).argmax(dim=1), minlength=k)
    assert int(counts.min()) >= need
    assert result.feasible and result.metrics["coverage_violation"] == 0.0


def test_the_coverage_auction_stops_where_no_weights_can_help():
    # need × K > V: no β gives every class `need` rows, so the auction leaves β as it was.
    logits, _ = long_tailed_logits(0, 3, n=4)
    beta = torch.tensor([0.3, -0.1, -0.2], dtype=torch.float64)
    assert torch.equal(_raise_uncovered(logits.double(), beta, 5, 10), beta)
    # Met already: nothing to raise (β is only re-centred).
    counts = torch.bincount((logits.double() + beta).argmax(dim=1), minlength=3)
    out = _raise_uncovered(logits.double(), beta, int(counts.min()), 10)
    assert torch.allclose(out, beta - beta.mean())


def test_the_coverage_auction_gives_the_short_class_exactly_what_it_needs():
    # Hand case: class 2 is nobody's argmax; raising it to 2 rows takes the two rows nearest its boundary.
    logits = torch.tensor([[3.0, 0.0, 2.0], [3.0, 0.0, 1.0], [0.0, 3.0, 0.5], [0.0, 3.0, 2.5], [3.0, 0.0, -1.0],
                           [0.0, 3.0, -1.0]], dtype=torch.float64)
    beta = _raise_uncovered(logits, torch.zeros(3, dtype=torch.float64), 2, 10)
    preds = (logits + beta).argmax(dim=1)
    assert preds.tolist() == [2, 0, 1, 2, 0, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_coverage_floor_raises_only_short_classes_and_is_then_a_fixed_point(seed):
    # K = 8, 20 rows per class, α = 0.9: 18 predictions per class; the long-tailed tilt starves the last classes.
    k, n, alpha = 8, 20, 0.9
    logits, _ = long_tailed_logits(seed, k, n)
    logits = logits - torch.linspace(0.0, 2.0, k)
    need = math.ceil(alpha * n)
    before = logits.double().argmax(dim=1)
    short = torch.bincount(before, minlength=k) < need
    assert short.any()
    beta = coverage_floor(logits, alpha)
    after = (logits.double() + beta).argmax(dim=1)
    assert int(torch.bincount(after, minlength=k).min()) >= need
    assert abs(float(beta.mean())) < 1e-12
    # an auction: biases only go up from a common base, so every class that was short is raised, and every row
    # that changed hands went to a raised class (one that was short when its turn came)
    raised = beta > beta.min() + 1e-12
    moved = after != before
    assert bool(raised[short].all()) and moved.any() and bool(raised[after[moved]].all())
    assert int(raised.sum()) < k
    # met now, so a second call moves nothing: a refresh repeated after a preemption finds the same head
    assert torch.equal(coverage_floor(logits.double() + beta, alpha), torch.zeros(k, dtype=torch.float64))


def test_the_coverage_floor_refuses_a_floor_no_bias_can_reach():
    logits, _ = long_tailed_logits(0, 4, n=3)   # V = 12, K = 4: 3 rows each at most
    assert torch.equal(coverage_floor(logits, 1.0), coverage_floor(logits, 1.0))  # α = 1 asks exactly 3: reachable
    with pytest.raises(ValueError, match="asks 3 of 11 validation predictions per class"):
        coverage_floor(logits[:11], 1.0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        coverage_floor(logits, 0.0)
    with pytest.raises(ValueError, match=r"finite \[V, K\]"):
        coverage_floor(logits[0], 0.5)
