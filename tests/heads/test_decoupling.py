"""selmix_dist.heads.decoupling (Kang et al. 2020): τ-normalisation and its validation choice against hand and
sklearn values, the class-balanced sampler by chi-square, LWS against a hand-computed SGD step, cRT against
sklearn's class-balanced logistic regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score
from torch import nn

from selmix_dist.core.rng import generator
from selmix_dist.heads.decoupling import (
    ClassBalancedSampler,
    classifier_retrain,
    learn_weight_scaling,
    select_tau,
    tau_normalize,
)


def linear(weight, bias) -> nn.Linear:
    head = nn.Linear(len(weight[0]), len(weight))
    head.load_state_dict({"weight": torch.tensor(weight), "bias": torch.tensor(bias)})
    return head


def long_tailed_gaussians(counts, dim=2, seed=0, spread=1.0):
    """Class k ~ N(μ_k, spread² I) with μ_k on a circle of radius 2; returns float32 features and labels."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(len(counts)) / len(counts)
    means = np.zeros((len(counts), dim))
    means[:, 0], means[:, 1] = 2 * np.cos(angles), 2 * np.sin(angles)
    x = np.concatenate([rng.normal(means[k], spread, size=(n, dim)) for k, n in enumerate(counts)])
    y = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ τ-norm
def test_tau_normalize_hand_values():
    head = linear([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], [1.0, -2.0, 5.0])
    unit = tau_normalize(head, 1.0)
    torch.testing.assert_close(unit.weight, torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]]))
    assert unit.bias.tolist() == [0.0, 0.0, 0.0]                  # Kang et al. score x·w̃_i, no bias
    half = tau_normalize(head, 0.5)                                # ‖w_0‖ = 5, ‖w_1‖ = 2
    torch.testing.assert_close(half.weight[0], torch.tensor([3.0, 4.0]) / 5 ** 0.5)
    torch.testing.assert_close(half.weight[1], torch.tensor([0.0, 2.0]) / 2 ** 0.5)
    torch.testing.assert_close(tau_normalize(head, 0.0).weight, head.weight)
    assert head.bias.tolist() == [1.0, -2.0, 5.0]                  # the input head is untouched
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(head, -0.1)


def test_select_tau_matches_a_brute_force_search():
    x, y = long_tailed_gaussians([400, 100, 25, 8], seed=1)
    erm = nn.Linear(2, 4)
    with torch.no_grad():   # an imbalanced head: the frequent classes have the longer rows
        erm.weight.copy_(torch.tensor([[3.0, 0.1], [0.2, 2.0], [-1.0, 0.1], [0.1, -0.6]]))
        erm.bias.zero_()
    vx, vy = long_tailed_gaussians([60, 60, 60, 60], seed=2)
    taus = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    tau, scores = select_tau(erm, vx, vy, taus)
    w = erm.weight.detach().numpy().astype(np.float64)
    expect = []
    for t in taus:   # numpy + sklearn: predictions argmax_i x·w_i / ‖w_i‖^t, balanced recall
        preds = (vx.numpy() @ (w / np.linalg.norm(w, axis=1, keepdims=True) ** t).T).argmax(axis=1)
        expect.append(recall_score(vy.numpy(), preds, average="macro"))
    np.testing.assert_allclose(scores, expect, atol=1e-12)
    assert tau == taus[int(np.argmax(expect))]
    assert max(expect) > expect[0]                                 # normalising helps here, so τ > 0 wins
    with pytest.raises(ValueError, match="metric"):
        select_tau(erm, vx, vy, taus, metric="mean_recal")


# ------------------------------------------------------------------------------------------------ sampler
def test_class_balanced_sampler_frequencies_by_chi_square():
    ordered = torch.tensor([0] * 500 + [1] * 50 + [2] * 5 + [4] * 2)   # class 3 absent
    labels = ordered[torch.randperm(len(ordered), generator=torch.Generator().manual_seed(0))]
    sampler = ClassBalancedSampler(labels)
    idx = torch.cat([sampler.draw(1000, generator(0, "test", t)) for t in range(24)])
    per_class = torch.bincount(labels[idx], minlength=5).numpy()
    assert per_class[3] == 0
    assert chisquare(per_class[[0, 1, 2, 4]]).pvalue > 1e-3        # uniform over the 4 present classes
    # instance-balanced sampling fails the same test (the test can fail)
    instance = labels[torch.randint(len(labels), (24_000,), generator=torch.Generator().manual_seed(0))]
    assert chisquare(torch.bincount(instance, minlength=5).numpy()[[0, 1, 2, 4]]).pvalue < 1e-10


def test_class_balanced_sampler_is_uniform_within_a_class():
    labels = torch.tensor([1, 0, 1, 1, 0, 1, 1])                   # class 1 at positions 0, 2, 3, 5, 6
    sampler = ClassBalancedSampler(labels)
    idx = torch.cat([sampler.draw(500, generator(3, "test", t)) for t in range(20)])
    members = idx[labels[idx] == 1]
    freq = torch.bincount(members, minlength=7).numpy()[[0, 2, 3, 5, 6]]
    assert chisquare(freq).pvalue > 1e-3
    assert set(idx[labels[idx] == 0].tolist()) == {1, 4}


# ------------------------------------------------------------------------------------------------ LWS
def test_lws_only_rescales_rows_and_its_first_step_matches_the_hand_gradient():
    x, y = long_tailed_gaussians([80, 20, 6], seed=3)
    head = linear([[1.5, 0.2], [-0.4, 1.0], [-0.8, -0.9]], [0.5, 0.2, -0.3])
    lr = 0.1
    one = learn_weight_scaling(head, x, y, steps=1, batch_size=32, lr=lr, momentum=0.0, seed=7)
    # by hand: z = logits of the batch, f = 1; d/df_k mean_b CE(f∘z_b, y_b) = mean_b (p_bk − [y_b = k]) z_bk
    idx = ClassBalancedSampler(y).draw(32, generator(7, "lws", 0))
    z = (x[idx].double() @ head.weight.detach().double().T + head.bias.detach().double())
    p = torch.softmax(z, dim=1)
    grad = ((p - torch.nn.functional.one_hot(y[idx], 3).double()) * z).mean(dim=0)
    f = 1.0 - lr * grad                                           # cosine lr at step 0 = lr
    torch.testing.assert_close(one.weight.double(), head.weight.detach().double() * f[:, None], atol=1e-6,
                               rtol=1e-6)
    torch.testing.assert_close(one.bias.double(), head.bias.detach().double() * f, atol=1e-6, rtol=1e-6)

    many = learn_weight_scaling(head, x, y, steps=300, batch_size=32, lr=0.05, seed=0)
    ratio = many.weight / head.weight                              # one factor per row, shared by the bias
    torch.testing.assert_close(ratio[:, 0], ratio[:, 1])
    torch.testing.assert_close(many.bias / head.bias, ratio[:, 0])


# ------------------------------------------------------------------------------------------------ cRT
def test_crt_matches_class_balanced_logistic_regression():
    """E over class-balanced batches of CE = Σ_n N/(K n_k) CE_n / N: sklearn's class_weight='balanced' with
    C = 1 / (weight_decay · N) minimises the same objective (bias unpenalised in both)."""
    x, y = long_tailed_gaussians([300, 60, 12], seed=4, spread=1.2)
    wd = 1e-2
    crt = classifier_retrain(x, y, 3, steps=4000, batch_size=64, lr=0.05, momentum=0.9, weight_decay=wd, seed=0)
    ref = LogisticRegression(C=1.0 / (wd * len(y)), class_weight="balanced", tol=1e-10, max_iter=10_000)
    ref.fit(x.numpy().astype(np.float64), y.numpy())
    grid = torch.tensor(np.mgrid[-4:4:0.5, -4:4:0.5].reshape(2, -1).T, dtype=torch.float32)
    with torch.no_grad():
        ours = torch.softmax(crt(grid), dim=1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(grid.numpy().astype(np.float64)), atol=0.03)
    # an instance-balanced fit differs from it by more than that tolerance (the comparison can fail)
    plain = LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert np.abs(plain.predict_proba(grid.numpy()) - ours).max() > 0.1
