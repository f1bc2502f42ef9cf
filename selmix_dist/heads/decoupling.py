"""Decoupled classifier baselines (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020) on fixed features, given a head trained with instance-balanced sampling (plain CE):

* cRT (classifier re-training): a new head trained from zeros with class-balanced sampling — every batch
  draws a class uniformly, then one of its samples uniformly (``ClassBalancedSampler``);
* τ-normalised classifier: rows w_i / ‖w_i‖^τ, the bias dropped (Kang et al.'s rule scores x·w̃_i only);
  τ = 0 keeps the weights, τ = 1 gives unit rows; τ is chosen on validation (``select_tau``);
* LWS (learnable weight scaling): logits f_i · (w_i·x + b_i) with only the scales f ∈ R^K trained (from 1)
  on class-balanced batches, i.e. every row (w_i, b_i) of the head is rescaled, never rotated.

Both trained variants minimise cross-entropy with SGD (Nesterov momentum, cosine learning rate); the batch of
step t is drawn with ``generator(seed, <method>, t)``, so a result is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selmix_dist.core.rng import generator
from selmix_dist.heads._inputs import check_head, check_labeled, check_positive, cosine_lr
from selmix_dist.heads.evaluate import evaluate_head
from selmix_dist.heads.fit import head_objective


class ClassBalancedSampler:
    """Draws sample indices with every class (present in ``labels`` int64[N]) equally likely, and every sample
    equally likely within its class."""

    def __init__(self, labels: torch.Tensor):
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty vector, got shape {tuple(labels.shape)}")
        self.order = torch.argsort(labels, stable=True)             # sample indices grouped by class
        self.classes, self.counts = torch.unique(labels, return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts    # first position of each class in `order`

    def draw(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """int64[batch_size] sample indices."""
        which = torch.randint(len(self.classes), (batch_size,), generator=gen)
        # floor(u · n_c) is uniform on {0, …, n_c − 1}; the clamp guards u · n_c rounding up to n_c.
        offset = (torch.rand(batch_size, generator=gen, dtype=torch.float64) * self.counts[which]).long()
        offset = torch.minimum(offset, self.counts[which] - 1)
        return self.order[self.starts[which] + offset]


def _balanced_sgd(params: list[torch.Tensor], batch_loss: Callable[[torch.Tensor], torch.Tensor],
                  labels: torch.Tensor, *, steps: int, batch_size: int, lr: float, momentum: float, seed: int,
                  stream: str) -> None:
    """``steps`` SGD steps on ``batch_loss(indices)`` over class-balanced batches of ``labels``' samples."""
    for value, name in ((steps, "steps"), (batch_size, "batch_size"), (lr, "lr")):
        check_positive(value, name)
    sampler = ClassBalancedSampler(labels.cpu())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    for step in range(steps):
        idx = sampler.draw(batch_size, generator(seed, stream, step)).to(labels.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        opt.zero_grad()
        batch_loss(idx).backward()
        opt.step()


def classifier_retrain(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 2000,
                       batch_size: int = 256, lr: float = 1e-3, momentum: float = 0.9,
                       weight_decay: float = 5e-4, seed: int = 0) -> nn.Linear:
    """cRT: features float[N, d], labels int64[N] in [0, K) -> a new nn.Linear(d, K) trained from zeros on
    class-balanced batches; loss = CE + (weight_decay / 2)‖W‖² (bias not regularised, as ``fit_head``)."""
    check_labeled(features, labels, num_classes)
    check_positive(weight_decay, "weight_decay", allow_zero=True)
    d = features.shape[1]
    weight = torch.zeros(num_classes, d, device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    x = features.to(torch.float32)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return head_objective(weight, bias, x[idx], labels[idx], None, weight_decay)

    _balanced_sgd([weight, bias], loss, labels, steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
                  seed=seed, stream="crt")
    head = nn.Linear(d, num_classes, device=features.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def tau_normalize(head: nn.Linear, tau: float) -> nn.Linear:
    """A new head with rows w_i / ‖w_i‖^τ and bias 0 (a zero row stays zero)."""
    check_head(head, head.in_features)
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    with torch.no_grad():
        norms = head.weight.norm(dim=1, keepdim=True)
        scale = torch.where(norms > 0, norms.pow(-tau), torch.zeros_like(norms))
        out = nn.Linear(head.in_features, head.out_features, device=head.weight.device, dtype=head.weight.dtype)
        out.weight.copy_(head.weight * scale)
        out.bias.zero_()
    return out


def select_tau(head: nn.Linear, val_features: torch.Tensor, val_labels: torch.Tensor, taus: Sequence[float],
               metric: str = "mean_recall") -> tuple[float, list[float]]:
    """The τ of ``taus`` whose τ-normalised head scores best on validation by ``metric`` (a
    ``compute_metrics`` key; ties go to the first τ), and the score of every τ."""
    if not taus:
        raise ValueError("taus is empty: give at least one τ to choose from")
    k = head.out_features
    scores = []
    for tau in taus:
        metrics = evaluate_head(tau_normalize(head, tau), val_features, val_labels, k)
        if metric not in metrics:
            raise ValueError(f"unknown validation metric {metric!r}; valid: {sorted(metrics)}")
        scores.append(float(metrics[metric]))
    best = max(range(len(taus)), key=lambda i: (scores[i], -i))
    return float(taus[best]), scores


def learn_weight_scaling(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, steps: int = 2000,
                         batch_size: int = 256, lr: float = 1e-2, momentum: float = 0.9,
                         seed: int = 0) -> nn.Linear:
    """LWS: head nn.Linear(d, K) (not modified), features float[N, d], labels int64[N] -> a new head whose
    row i is f_i · (w_i, b_i), the scales f float[K] (from 1) trained by CE on class-balanced batches."""
    k = head.out_features
    check_labeled(features, labels, k)
    check_head(head, features.shape[1], k)
    with torch.no_grad():
        logits = head(features.to(head.weight.device, head.weight.dtype))   # [N, K], fixed: only f moves
    scales = torch.ones(k, device=logits.device, dtype=logits.dtype, requires_grad=True)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[idx] * scales, labels[idx].to(logits.device))

    _balanced_sgd([scales], loss, labels, steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
                  seed=seed, stream="lws")
    out = nn.Linear(head.in_features, k, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(head.weight * scales[:, None])
        out.bias.copy_((head.bias if head.bias is not None else torch.zeros_like(scales)) * scales)
    return out
