"""The gain forecast (core.forecast): its bookkeeping by hand, and a first-order check on a real head: for a tiny
learning rate the realised change of ψ after SGD steps on pairs drawn from P matches the prediction."""

from __future__ import annotations

import pytest
import torch

from selmix_dist.core import build_objective, gain_matrix
from selmix_dist.core.forecast import GainForecast


def test_bookkeeping_by_hand():
    f = GainForecast()
    assert f.close(0, psi_before=0.3, lr_sum=1.0) is None          # nothing open yet
    gain = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    P = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    assert GainForecast.rate(gain, P) == pytest.approx(0.75)
    f.open(0, GainForecast.rate(gain, P), psi=0.30)
    out = f.close(50, psi_before=0.31, lr_sum=0.02)
    assert (out.step, out.next_step) == (0, 50)
    assert out.predicted == pytest.approx(0.75 * 0.02) and out.realised == pytest.approx(0.01)
    restored = GainForecast()
    restored.load_state_dict(f.state_dict())
    assert restored.close(50, 0.31, 0.02) == out
    assert f.close(0, 0.31, 0.02) is None                           # a refresh at or before the open one


def test_prediction_matches_a_small_step_of_the_soft_model():
    # The gain's model of C: C_ij = (1/K) softmax(W z_i + b)_j at the class prototypes z (the prototype
    # approximation). With C set to that soft matrix the model is exact, so for one tiny SGD step on the
    # expected mixup loss under P the realised change of ψ equals η Σ P∘G to first order.
    torch.manual_seed(0)
    k, d = 5, 7
    z = torch.randn(k, d, dtype=torch.float64)
    W = 0.3 * torch.randn(k, d, dtype=torch.float64)
    b = torch.zeros(k, dtype=torch.float64)
    objective = build_objective("g_mean", k)

    def soft_confusion(W):
        return torch.softmax(z @ W.T + b, dim=1) / k

    C = soft_confusion(W)
    gain = gain_matrix(z, W, b, C, objective.gradient(C), mixup_mean=1.0)
    P = torch.softmax(torch.randn(k * k, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 0)
    P = P.reshape(k, k)
    psi0 = float(objective.psi(C))
    eta = 1e-5
    # The expected gradient of CE(W z̃_ij, i) over pairs drawn from P, with λ = 1 (mixup mean 1: z̃_ij = z_i).
    Wv = W.clone().requires_grad_(True)
    logits = z @ Wv.T + b
    loss = -(P.sum(dim=1) * torch.log_softmax(logits, dim=1).diagonal()).sum()
    loss.backward()
    W1 = W - eta * Wv.grad
    realised = float(objective.psi(soft_confusion(W1))) - psi0
    predicted = GainForecast.rate(gain, P) * eta
    assert realised == pytest.approx(predicted, rel=1e-3)
