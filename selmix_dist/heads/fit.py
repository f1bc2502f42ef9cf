"""Fit a linear head nn.Linear(d, K) on fixed features with (logit-adjusted) cross-entropy.

Objective (both optimisers minimise exactly this):

    mean_n loss(W x_n + b, y_n) + (weight_decay / 2) * ||W||_F^2        (bias not regularised)

with loss = CE ("ce") or CE(a + tau log pi, y) ("logit_adjusted", pi = class frequencies of `labels`).
This is scikit-learn's multinomial LogisticRegression objective  ½||W||² + C Σ_n loss_n  divided by C·N,
i.e. weight_decay = 1 / (C · N).

* optimizer="lbfgs": full batch, strong-Wolfe line search, computed in `dtype` (float64 by default); exact
  and deterministic. Above BLOCK_LOGITS logits (N·K) the objective and its gradient are summed over blocks of
  rows in a fixed order, each converted to `dtype` when used, so memory is O(block·K + K·d) rather than an
  [N, K] float64 logit matrix and a float64 copy of the features (28 GB and 7 GB at iNaturalist-2018 size).
* optimizer="sgd": minibatch SGD with Nesterov momentum and a cosine learning rate; the batch of step t is
  drawn with generator(seed, "fit_head", t), so the result is a pure function of the seed.
At test time the plain logits a(x) = W x + b are used for both losses.
"""

from __future__ import annotations

import torch
from torch import nn

from selmix_dist.core.rng import generator
from selmix_dist.heads._inputs import (
    check_head,
    check_labeled,
    check_positive,
    class_frequencies,
    cosine_lr,
    log_prior,
)
from selmix_dist.heads.losses import logit_adjusted_cross_entropy

LOSSES = ("ce", "logit_adjusted")
OPTIMIZERS = ("lbfgs", "sgd")
BLOCK_LOGITS = 1 << 25   # 256 MiB of float64 logits per block; below it, one block (the exact same path)


def head_objective(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                   adjustment: torch.Tensor | None, weight_decay: float) -> torch.Tensor:
    """The regularised mean loss above. weight [K, d], bias [K], features [B, d], labels [B],
    adjustment [K] (tau log pi) or None for plain CE."""
    logits = features @ weight.T + bias
    if adjustment is None:
        loss = nn.functional.cross_entropy(logits, labels)
    else:
        loss = logit_adjusted_cross_entropy(logits, labels, adjustment)
    return loss + 0.5 * weight_decay * weight.pow(2).sum()


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, loss: str = "ce",
             tau: float = 1.0, weight_decay: float = 0.0, optimizer: str = "lbfgs", max_iter: int = 1000,
             tol: float = 1e-9, steps: int = 2000, batch_size: int = 256, lr: float = 0.1,
             momentum: float = 0.9, seed: int = 0, init: nn.Linear | None = None,
             dtype: torch.dtype = torch.float64) -> nn.Linear:
    """features float[N, d], labels int64[N] in [0, K) -> a new float32 nn.Linear(d, K) on features.device.

    lbfgs: `max_iter` iterations at most, stops when the gradient's max-abs entry is below `tol` or the
    objective changes by less than 1e-12 between iterations.
    sgd: `steps` minibatches of `batch_size` (with replacement), base learning rate `lr`, `momentum`.
    init: start from this head (copied, not modified); zeros otherwise (the problem is convex).
    """
    check_labeled(features, labels, num_classes)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    check_positive(weight_decay, "weight_decay", allow_zero=True)
    n, d = features.shape
    device = features.device
    adjustment = None
    if loss == "logit_adjusted":
        adjustment = tau * log_prior(class_frequencies(labels, num_classes), "labeled class frequencies")
        adjustment = adjustment.to(device=device, dtype=dtype)

    weight = torch.zeros(num_classes, d, dtype=dtype, device=device)
    bias = torch.zeros(num_classes, dtype=dtype, device=device)
    if init is not None:
        check_head(init, d, num_classes)
        weight.copy_(init.weight.detach())
        if init.bias is not None:
            bias.copy_(init.bias.detach())
    weight.requires_grad_(True)
    bias.requires_grad_(True)

    if optimizer == "lbfgs":
        _run_lbfgs(weight, bias, features, labels, adjustment, weight_decay, max_iter, tol)
    else:
        check_positive(steps, "steps")
        check_positive(batch_size, "batch_size")
        _run_sgd(weight, bias, features.to(dtype), labels, adjustment, weight_decay, steps, batch_size, lr,
                 momentum, seed)

    head = nn.Linear(d, num_classes, device=device)
    with torch.no_grad():
        head.weight.copy_(weight.detach())
        head.bias.copy_(bias.detach())
    return head


def full_batch_backward(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                        adjustment: torch.Tensor | None, weight_decay: float) -> torch.Tensor:
    """`head_objective` over all rows, its gradient accumulated into weight.grad / bias.grad; the value.

    features [N, d] in any float dtype, converted to weight's dtype block by block (BLOCK_LOGITS)."""
    n, rows = features.shape[0], _block_rows(weight.shape[0])
    if n <= rows:
        value = head_objective(weight, bias, features.to(weight.dtype), labels, adjustment, weight_decay)
        value.backward()
        return value.detach()
    # Mean over N = Σ over blocks of (block mean) · (block rows / N); the regulariser once, on its own.
    value = 0.5 * weight_decay * weight.pow(2).sum()
    value.backward()
    value = value.detach()
    for start in range(0, n, rows):
        block = head_objective(weight, bias, features[start:start + rows].to(weight.dtype),
                               labels[start:start + rows], adjustment, 0.0)
        block = block * (min(rows, n - start) / n)
        block.backward()
        value = value + block.detach()
    return value


def _block_rows(num_classes: int) -> int:
    return max(1, BLOCK_LOGITS // num_classes)


def _run_lbfgs(weight, bias, features, labels, adjustment, weight_decay, max_iter, tol) -> None:
    if features.shape[0] <= _block_rows(weight.shape[0]):
        features = features.to(weight.dtype)  # one block: converted once here, not at every evaluation
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=tol, tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        return full_batch_backward(weight, bias, features, labels, adjustment, weight_decay)

    opt.step(closure)


def _run_sgd(weight, bias, x, labels, adjustment, weight_decay, steps, batch_size, lr, momentum,
             seed) -> None:
    # Weight decay is inside the objective (not the optimizer) so both optimisers minimise the same function.
    opt = torch.optim.SGD([weight, bias], lr=lr, momentum=momentum, nesterov=momentum > 0)
    n = x.shape[0]
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=generator(seed, "fit_head", step)).to(x.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        opt.zero_grad()
        head_objective(weight, bias, x[idx], labels[idx], adjustment, weight_decay).backward()
        opt.step()
