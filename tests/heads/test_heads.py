"""selmix_dist.heads: heads on fixed features, logit adjustment, self-training, mixup, cost-sensitive."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from selmix_dist.core import build_objective, generator
from selmix_dist.heads import (
    cost_sensitive_finetune,
    cost_sensitive_gain,
    draw_mixup_batch,
    evaluate_head,
    fit_head,
    fixmatch_la_loss,
    head_objective,
    hybrid_cost_sensitive_loss,
    logit_adjusted_cross_entropy,
    mixup_finetune,
    mixup_loss,
    posthoc_adjust,
    self_train_head,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    return torch.from_numpy(x).to(torch.float32), torch.from_numpy(y).to(torch.int64)


@pytest.fixture(scope="module")
def imbalanced_digits(digits):
    """Long-tailed training subset (n_k = 150 * 0.6^k, 150 … 1) and a balanced held-out set (20/class)."""
    x, y = digits
    train, held = [], []
    for k in range(10):
        idx = torch.nonzero(y == k).flatten()
        train.append(idx[:max(1, int(150 * 0.6 ** k))])
        held.append(idx[-20:])
    train, held = torch.cat(train), torch.cat(held)
    return x[train], y[train], x[held], y[held]


def linear(weight, bias) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head


# ------------------------------------------------------------------------------------- logit adjustment
def test_posthoc_adjust_matches_hand_computed_decisions():
    # head: identity weights, bias b = [0.2, 0, 0], so logits = x + b. Prior pi = [0.5, 0.3, 0.2]:
    # -log pi = [0.6931, 1.2040, 1.6094]. Adjusted logits (tau = 1) = logits - log pi:
    #   x = [1.0, 0.6, 0.2]: [1.8931, 1.8040, 1.8094] -> 0   (raw [1.2, 0.6, 0.2] -> 0)
    #   x = [1.0, 0.8, 0.2]: [1.8931, 2.0040, 1.8094] -> 1
    #   x = [1.0, 0.3, 0.5]: [1.8931, 1.5040, 2.1094] -> 2
    #   x = [0.0, 0.0, 0.0]: [0.8931, 1.2040, 1.6094] -> 2
    # tau = 0.5 adds half of -log pi = [0.3466, 0.6020, 0.8047]:
    #   [1.5466, 1.2020, 1.0047] -> 0; [1.5466, 1.4020, 1.0047] -> 0; [1.5466, 0.9020, 1.3047] -> 0;
    #   [0.5466, 0.6020, 0.8047] -> 2
    head = linear(torch.eye(3), [0.2, 0.0, 0.0])
    x = torch.tensor([[1.0, 0.6, 0.2], [1.0, 0.8, 0.2], [1.0, 0.3, 0.5], [0.0, 0.0, 0.0]])
    counts = torch.tensor([50.0, 30.0, 20.0])  # counts or frequencies: normalised inside
    assert head(x).argmax(1).tolist() == [0, 0, 0, 0]
    assert posthoc_adjust(head, counts).forward(x).argmax(1).tolist() == [0, 1, 2, 2]
    assert posthoc_adjust(head, counts / 100, tau=0.5).forward(x).argmax(1).tolist() == [0, 0, 0, 2]
    adjusted = posthoc_adjust(head, counts)
    np.testing.assert_allclose(adjusted.bias.detach().numpy(),
                               [0.2 - np.log(0.5), -np.log(0.3), -np.log(0.2)], rtol=1e-6)
    assert torch.equal(adjusted.weight, head.weight) and head.bias.tolist() == pytest.approx([0.2, 0, 0])
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        posthoc_adjust(head, torch.tensor([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        posthoc_adjust(head, torch.tensor([0.5, 0.5]))


def test_logit_adjusted_loss_hand_values_and_gradient():
    # equal logits: softmax(log pi) = pi, so the loss is -log pi_y.
    log_pi = torch.log(torch.tensor([0.8, 0.2]))
    loss = logit_adjusted_cross_entropy(torch.zeros(1, 2), torch.tensor([1]), log_pi)
    assert loss.item() == pytest.approx(-np.log(0.2), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    log_pi = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64))
    logit_adjusted_cross_entropy(logits, labels, log_pi, tau=0.7).backward()
    z = logits.detach().numpy() + 0.7 * log_pi.numpy()
    hand = (np_softmax(z) - np.eye(4)[labels.numpy()]) / 6
    np.testing.assert_allclose(logits.grad.numpy(), hand, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------- fit_head
def test_ce_head_matches_sklearn_logistic_regression(digits):
    x, y = digits
    c = 0.1
    with threadpool_limits(1):
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x.double().numpy(), y.numpy())
    head = fit_head(x, y, 10, weight_decay=1.0 / (c * len(x)))  # sklearn: ½||W||² + C Σ loss, ÷ C·N
    weight, bias = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    assert np.abs(weight - ref.coef_).max() < 1e-3 * max(1.0, np.abs(ref.coef_).max())
    # the bias is identified only up to a shared constant (softmax is shift invariant)
    np.testing.assert_allclose(bias - bias.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-3)
    with torch.no_grad():
        probs = torch.softmax(head(x).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x.double().numpy()), atol=1e-4)


def test_blocked_full_batch_objective_and_gradient_equal_the_one_block_ones(digits, monkeypatch):
    """Above BLOCK_LOGITS the L-BFGS objective is summed over row blocks (the last one short), the features
    converted per block; value and gradient equal the one-block computation at a random head."""
    from selmix_dist.heads import fit as fit_module

    x, y = digits
    gen = torch.Generator().manual_seed(0)
    point = (torch.randn(10, x.shape[1], generator=gen, dtype=torch.float64) * 0.1,
             torch.randn(10, generator=gen, dtype=torch.float64))
    adjustment = torch.log(torch.bincount(y, minlength=10).double() / len(y)) * 0.7

    def value_and_grads():
        weight, bias = (t.clone().requires_grad_(True) for t in point)
        value = fit_module.full_batch_backward(weight, bias, x, y, adjustment, 1e-2)
        return value, weight.grad, bias.grad

    one, head = value_and_grads(), fit_head(x, y, 10, weight_decay=1e-2)
    monkeypatch.setattr(fit_module, "BLOCK_LOGITS", 10 * 97)  # 97-row blocks: 19 blocks, the last of 51 rows
    blocked, blocked_head = value_and_grads(), fit_head(x, y, 10, weight_decay=1e-2)
    for a, b in zip(one, blocked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # and both are the objective written out
        direct = head_objective(point[0], point[1], x.double(), y, adjustment, 1e-2)
    torch.testing.assert_close(blocked[0], direct, rtol=1e-12, atol=0)
    # the same optimum, up to the summation order (whether that order changes a bit is up to the CPU's kernels)
    torch.testing.assert_close(blocked_head.weight, head.weight, rtol=0, atol=1e-5)


def test_logit_adjusted_head_is_a_shifted_ce_head(imbalanced_digits):
    # Only W is regularised, so CE(Wx + b + tau log pi) is CE re-parameterised by b' = b + tau log pi:
    # the LA optimum has the CE weights and bias b_CE - tau log pi (up to a shared constant), i.e. it is
    # exactly the post-hoc adjusted CE head.
    x, y, _, _ = imbalanced_digits
    tau, wd = 0.7, 1e-2
    ce = fit_head(x, y, 10, weight_decay=wd)
    la = fit_head(x, y, 10, loss="logit_adjusted", tau=tau, weight_decay=wd)
    pi = torch.bincount(y, minlength=10).double() / len(y)
    np.testing.assert_allclose(la.weight.detach().numpy(), ce.weight.detach().numpy(), atol=1e-4)
    expected = ce.bias.detach().double() - tau * torch.log(pi)
    got = la.bias.detach().double()
    np.testing.assert_allclose((got - got.mean()).numpy(), (expected - expected.mean()).numpy(), atol=1e-4)
    post = posthoc_adjust(ce, pi, tau)
    with torch.no_grad():
        post_probs, la_probs = torch.softmax(post(x), 1), torch.softmax(la(x), 1)
    np.testing.assert_allclose(post_probs.numpy(), la_probs.numpy(), atol=1e-4)
    # and the adjusted rule trades head accuracy for tail recall on balanced held-out data
    _, _, xv, yv = imbalanced_digits
    assert evaluate_head(la, xv, yv, 10)["mean_recall"] > evaluate_head(ce, xv, yv, 10)["mean_recall"]


def test_minibatch_fit_is_deterministic_and_reaches_the_lbfgs_optimum(digits):
    x, y = digits
    wd = 1e-2
    exact = fit_head(x, y, 10, weight_decay=wd)
    kw = dict(weight_decay=wd, optimizer="sgd", steps=400, batch_size=256, lr=0.5)
    a, b = fit_head(x, y, 10, seed=1, **kw), fit_head(x, y, 10, seed=1, **kw)
    c = fit_head(x, y, 10, seed=2, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)

    def objective(h):
        with torch.no_grad():
            return head_objective(h.weight.double(), h.bias.double(), x.double(), y, None, wd).item()

    assert objective(exact) <= objective(a) < objective(exact) + 2e-3
    # warm start from the optimum: L-BFGS stays there
    again = fit_head(x, y, 10, weight_decay=wd, init=exact)
    np.testing.assert_allclose(again.weight.detach().numpy(), exact.weight.detach().numpy(), atol=1e-5)


def test_fit_head_rejects_bad_input(digits):
    x, y = digits
    with pytest.raises(ValueError, match="unlabeled samples"):
        fit_head(x[:5], torch.tensor([0, 1, -1, 2, 3]), 10)
    with pytest.raises(ValueError, match="loss must be one of"):
        fit_head(x, y, 10, loss="focal")
    missing = y.clone()
    missing[missing == 4] = 3
    with pytest.raises(ValueError, match=r"classes \[4\]"):
        fit_head(x, missing, 10, loss="logit_adjusted")


# ------------------------------------------------------------------------------------- self-training
def test_fixmatch_la_loss_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    k, d = 4, 5
    head = linear(3 * torch.randn(k, d, generator=gen), torch.randn(k, generator=gen))
    xl, yl = torch.randn(6, d, generator=gen), torch.tensor([0, 1, 2, 3, 3, 1])
    weak = torch.randn(10, d, generator=gen) * torch.linspace(0.05, 2.0, 10).unsqueeze(1)
    strong = weak + 0.3 * torch.randn(10, d, generator=gen)
    log_pi = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    loss, rate = fixmatch_la_loss(head, xl, yl, weak, strong, log_pi, threshold=0.95, lambda_u=1.5)

    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    sup = 0.0
    for xi, yi in zip(xl.double().numpy(), yl.tolist(), strict=True):
        z = w @ xi + b + log_pi.double().numpy()
        sup -= np.log(np_softmax(z)[yi]) / len(yl)
    unsup, kept = 0.0, 0
    for wi, si in zip(weak.double().numpy(), strong.double().numpy(), strict=True):
        p = np_softmax(w @ wi + b)
        if p.max() >= 0.95:
            kept += 1
            unsup -= np.log(np_softmax(w @ si + b)[p.argmax()]) / len(weak)
    assert 0 < kept < len(weak)  # the case exercises both branches of the threshold
    assert loss.item() == pytest.approx(sup + 1.5 * unsup, rel=1e-5)
    assert rate.item() == pytest.approx(kept / len(weak))


def test_self_training_is_deterministic_and_reads_no_unlabeled_labels(imbalanced_digits):
    x, y, xv, _ = imbalanced_digits
    init = fit_head(x, y, 10, loss="logit_adjusted", weight_decay=1e-2)
    before = init.weight.detach().clone()
    kw = dict(steps=20, batch_size=32, lr=0.05)
    # the unlabeled pool is passed as features only: the API has no way to receive its labels
    a = self_train_head(init, x, y, xv, seed=0, **kw)
    b = self_train_head(init, x, y, xv, seed=0, **kw)
    c = self_train_head(init, x, y, xv, seed=1, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert torch.equal(init.weight, before)  # the given head is not modified
    # with lambda_u = 0 the unlabeled features only consume random numbers: their values do not matter
    z1 = self_train_head(init, x, y, xv, seed=0, lambda_u=0.0, **kw)
    z2 = self_train_head(init, x, y, torch.randn_like(xv), seed=0, lambda_u=0.0, **kw)
    assert torch.equal(z1.weight, z2.weight)
    assert not torch.equal(z1.weight, a.weight)  # ... while with lambda_u = 1 the pseudo-label term acts
    with pytest.raises(ValueError, match="unlabeled samples"):
        self_train_head(init, x, torch.full_like(y, -1), xv, seed=0, **kw)


# ------------------------------------------------------------------------------------- mixup
def test_mixup_single_step_matches_hand_sgd(imbalanced_digits):
    x, y, partners, _ = imbalanced_digits
    init = fit_head(x, y, 10, weight_decay=1e-2)
    lr, wd, batch, seed = 0.1, 5e-4, 16, 7
    out = mixup_finetune(init, x, y, partners, steps=1, batch_size=batch, lr=lr, seed=seed, weight_decay=wd)
    li, pi, lam = draw_mixup_batch(len(x), len(partners), batch, generator(seed, "mixup", 0), 0.6)
    assert ((lam >= 0.6) & (lam <= 1.0)).all()
    w0, b0 = init.weight.detach().double().numpy(), init.bias.detach().double().numpy()
    lam_np = lam.double().numpy()[:, None]
    z = lam_np * x[li].double().numpy() + (1 - lam_np) * partners[pi].double().numpy()
    err = (np_softmax(z @ w0.T + b0) - np.eye(10)[y[li].numpy()]) / batch
    # plain SGD (no momentum), weight decay on W only, cosine lr = lr at step 0
    np.testing.assert_allclose(out.weight.detach().numpy(), w0 - lr * (err.T @ z + wd * w0), atol=1e-5)
    np.testing.assert_allclose(out.bias.detach().numpy(), b0 - lr * err.sum(0), atol=1e-5)
    loss = mixup_loss(init, x[li], partners[pi], y[li], lam)
    hand = -np.mean(np.log(np_softmax(z @ w0.T + b0)[np.arange(batch), y[li].numpy()]))
    assert loss.item() == pytest.approx(hand, rel=1e-5)


def test_mixup_lambda_distribution():
    _, _, lam = draw_mixup_batch(5, 5, 20000, generator(0, "t"), lambda_min=0.6)
    assert lam.min() >= 0.6 and lam.max() <= 1.0
    assert abs(lam.mean().item() - 0.8) < 0.01  # U(0.6, 1): mean 0.8, std of the mean ≈ 0.0008


# ------------------------------------------------------------------------------------- cost-sensitive
def test_hybrid_loss_matches_brute_force_and_reduces_to_la():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2, 0])
    gain = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 4.0]], dtype=torch.float64)
    brute = 0.0
    for f, yb in zip(logits.numpy(), labels.tolist(), strict=True):
        q = np_softmax(f - np.log(np.diag(gain.numpy())))
        brute -= sum(gain[yb, i].item() / gain[i, i].item() * np.log(q[i]) for i in range(3)) / 5
    assert hybrid_cost_sensitive_loss(logits, labels, gain).item() == pytest.approx(brute, rel=1e-12)
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert hybrid_cost_sensitive_loss(logits, labels, torch.diag(1 / pi)).item() == pytest.approx(
        logit_adjusted_cross_entropy(logits, labels, torch.log(pi)).item(), rel=1e-12)


def test_cost_sensitive_gain_hand_cases():
    rng = np.random.default_rng(0)
    k = 4
    counts = torch.from_numpy(rng.integers(1, 30, size=(k, k)))
    joint = counts.double() / counts.sum()
    rho = joint.sum(1)
    pi = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    # mean recall: training gain diag(1 / (K pi)) whatever C (logit adjustment)
    mean_recall = build_objective("mean_recall", k)
    g = cost_sensitive_gain(mean_recall.gradient(joint), rho, pi)
    np.testing.assert_allclose(g.numpy(), np.diag(1 / (k * pi.numpy())), atol=1e-12)
    # min recall (beta = 0, omega = 50): lambda = softmax(-50 r), gain diag(lambda / pi)
    min_recall = build_objective("min_recall", k)
    min_recall.update_multipliers(joint)
    lam = np_softmax(-50 * (np.diag(joint.numpy()) / rho.numpy()))
    g = cost_sensitive_gain(min_recall.gradient(joint), rho, pi)
    np.testing.assert_allclose(g.numpy(), np.diag(lam / pi.numpy()), rtol=1e-9, atol=1e-300)
    # a coverage-style Psi = I + 1 lambda^T with lambda = [0, 0.5, 2]; row minima off the diagonal are
    # 0.5 (row 0), 0 (rows 1, 2): canon = [[0.5, 0, 1.5], [0, 1.5, 2], [0, 0.5, 3]], then rows * rho/pi
    psi = torch.eye(3, dtype=torch.float64) + torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    rho3, pi3 = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.5, 0.4, 0.1])
    canon = np.array([[0.5, 0, 1.5], [0, 1.5, 2], [0, 0.5, 3]])
    expected = canon * (rho3 / pi3).double().numpy()[:, None]
    np.testing.assert_allclose(cost_sensitive_gain(psi, rho3, pi3).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no positive diagonal"):
        cost_sensitive_gain(-torch.eye(3, dtype=torch.float64), rho3, pi3)


def test_cost_sensitive_step_for_mean_recall_is_an_la_sgd_step(imbalanced_digits):
    x, y, xv, yv = imbalanced_digits  # balanced validation: 20 per class
    init = fit_head(x, y, 10, weight_decay=1e-2)
    lr, wd, batch, seed = 0.2, 1e-3, 32, 5
    res = cost_sensitive_finetune(init, x, y, xv, yv, build_objective("mean_recall", 10), steps=1,
                                  batch_size=batch, lr=lr, momentum=0.0, weight_decay=wd, seed=seed)
    pi = (torch.bincount(y, minlength=10).double() / len(y)).numpy()
    assert len(res.history) == 1 and res.history[0]["step"] == 0
    np.testing.assert_allclose(res.history[0]["gain_diagonal"].numpy(), 1 / (10 * pi), rtol=1e-9)
    idx = torch.randint(len(x), (batch,), generator=generator(seed, "cost_sensitive", 0))
    w0, b0 = init.weight.detach().double().numpy(), init.bias.detach().double().numpy()
    xb = x[idx].double().numpy()
    err = (np_softmax(xb @ w0.T + b0 + np.log(pi)) - np.eye(10)[y[idx].numpy()]) / batch
    np.testing.assert_allclose(res.head.weight.detach().numpy(), w0 - lr * (err.T @ xb + wd * w0), atol=1e-5)
    np.testing.assert_allclose(res.head.bias.detach().numpy(), b0 - lr * err.sum(0), atol=1e-5)


def test_cost_sensitive_min_recall_raises_min_recall(imbalanced_digits):
    # sanity check only (the exact checks are above): a CE head on long-tailed data has a poor worst
    # class; fine-tuning with the min-recall multipliers should lift it on the validation data.
    x, y, xv, yv = imbalanced_digits
    init = fit_head(x, y, 10, weight_decay=1e-2)
    res = cost_sensitive_finetune(init, x, y, xv, yv, build_objective("min_recall", 10), steps=300,
                                  batch_size=64, lr=0.05, refresh_every=25, seed=0)
    before, after = evaluate_head(init, xv, yv, 10), evaluate_head(res.head, xv, yv, 10)
    assert after["min_recall"] > before["min_recall"]
    assert len(res.history) == 12 and set(res.history[0]["multipliers"]) == {"lambda"}


def test_cost_sensitive_self_training_term_is_deterministic(imbalanced_digits):
    x, y, xv, yv = imbalanced_digits
    init = fit_head(x, y, 10, weight_decay=1e-2)
    kw = dict(steps=20, batch_size=32, lr=0.05, refresh_every=10)

    def run(unlabeled, seed=0):
        return cost_sensitive_finetune(init, x, y, xv, yv, build_objective("min_recall", 10), seed=seed,
                                       unlabeled_features=unlabeled, **kw).head.weight

    unlabeled = xv.flip(0)  # features only: the unlabeled API takes no labels
    assert torch.equal(run(unlabeled), run(unlabeled))
    assert not torch.equal(run(unlabeled), run(None))  # the pseudo-label term contributes
    assert not torch.equal(run(unlabeled), run(unlabeled, seed=1))


# ------------------------------------------------------------------------------------- evaluation
def test_evaluate_head_matches_brute_force(imbalanced_digits):
    x, y, xv, yv = imbalanced_digits
    head = fit_head(x, y, 10, weight_decay=1e-2)
    mask = torch.arange(10) < 9
    out = evaluate_head(head, xv, yv, 10, head_mask=mask, batch_size=7)
    with torch.no_grad():
        preds = (xv.double() @ head.weight.double().T + head.bias.double()).argmax(1).numpy()
    recall = [float(np.mean(preds[yv.numpy() == k] == k)) for k in range(10)]
    np.testing.assert_allclose(out["per_class_recall"], recall, rtol=1e-12)
    assert out["accuracy"] == pytest.approx(float(np.mean(preds == yv.numpy())))
    assert out["min_recall"] == pytest.approx(min(recall))
    assert out["tail_recall"] == pytest.approx(recall[9])
    assert out["head_recall"] == pytest.approx(np.mean(recall[:9]))
