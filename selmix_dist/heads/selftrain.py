"""FixMatch-style self-training of a linear head on fixed features, with the logit-adjusted labeled loss
(the feature-space analogue of the "FixMatch (LA)" pre-training SelMix starts from, docs/method.md §1.4).

Per step t (all randomness from generator(seed, "self_train", t)):
  * B labeled samples and mu·B unlabeled samples, drawn uniformly with replacement;
  * weak view  = the unlabeled features as they are;
    strong view = a feature-space perturbation: inverted dropout with rate `dropout` (kept entries scaled by
    1/(1-dropout)), then additive Gaussian noise with per-dimension std `noise_std · s_k`, where s_k is the
    standard deviation of feature k over the unlabeled pool (so `noise_std` is scale free);
  * pseudo-label = argmax of softmax(a(weak)) of the *current* head (plain logits, no gradient), kept when
    its confidence is >= `threshold` (FixMatch's hard-label rule);
  * loss = CE(a(x_l) + tau log pi, y_l)
           + lambda_u · mean_u[ 1{conf_u >= threshold} · CE(a(strong_u), pseudo_u) ]
    (the unlabeled mean runs over all mu·B samples, masked ones contributing 0, as in FixMatch);
  * SGD with Nesterov momentum, weight decay on the weight only, FixMatch's schedule lr·cos(7πt / (16T)).
The API takes no labels for the unlabeled data, so hidden labels cannot leak in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selmix_dist.core.rng import generator
from selmix_dist.heads._inputs import (
    check_features,
    check_head,
    check_labeled,
    check_positive,
    class_frequencies,
    copy_head,
    log_prior,
    param_groups,
)
from selmix_dist.heads.losses import logit_adjusted_cross_entropy


def strong_view(features: torch.Tensor, gen: torch.Generator, dropout: float, noise_std: float,
                feature_std: torch.Tensor) -> torch.Tensor:
    """features float[B, d], feature_std float[d] -> perturbed float[B, d] (see module docstring).
    Random numbers are drawn on the CPU generator `gen` and moved, so results do not depend on the device."""
    shape = features.shape
    keep = (torch.rand(shape, generator=gen) >= dropout).to(features.device, features.dtype)
    noise = torch.randn(shape, generator=gen).to(features.device, features.dtype)
    return features * keep / (1.0 - dropout) + noise_std * feature_std * noise


def pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float[B, K] -> (argmax int64[B], confident bool[B] = max softmax prob >= threshold)."""
    conf, labels = torch.softmax(logits, dim=1).max(dim=1)
    return labels, conf >= threshold


def fixmatch_la_loss(head: nn.Linear, labeled_x: torch.Tensor, labeled_y: torch.Tensor, weak_x: torch.Tensor,
                     strong_x: torch.Tensor, adjustment: torch.Tensor, *, threshold: float,
                     lambda_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One FixMatch-LA loss. labeled_x [B, d], labeled_y int64[B], weak_x / strong_x [U, d] (same samples),
    adjustment [K] = tau log pi -> (scalar loss, fraction of unlabeled samples above the threshold)."""
    sup = logit_adjusted_cross_entropy(head(labeled_x), labeled_y, adjustment)
    with torch.no_grad():
        targets, confident = pseudo_labels(head(weak_x), threshold)
    per_sample = F.cross_entropy(head(strong_x), targets, reduction="none")
    unsup = (per_sample * confident.to(per_sample.dtype)).mean()
    return sup + lambda_u * unsup, confident.to(torch.float32).mean()


def self_train_head(head: nn.Linear, labeled_features: torch.Tensor, labels: torch.Tensor,
                    unlabeled_features: torch.Tensor, *, steps: int, batch_size: int = 64,
                    unlabeled_ratio: int = 2, lr: float = 0.03, momentum: float = 0.9,
                    weight_decay: float = 5e-4, threshold: float = 0.95, lambda_u: float = 1.0,
                    tau: float = 1.0, dropout: float = 0.3, noise_std: float = 0.1,
                    seed: int = 0) -> nn.Linear:
    """head nn.Linear(d, K) (copied, not modified); labeled_features float[N_l, d], labels int64[N_l] in
    [0, K); unlabeled_features float[N_u, d] (no labels) -> the self-trained copy of the head."""
    num_classes = head.out_features
    check_labeled(labeled_features, labels, num_classes, "labeled_features")
    check_features(unlabeled_features, "unlabeled_features")
    check_head(head, labeled_features.shape[1], num_classes)
    if unlabeled_features.shape[1] != labeled_features.shape[1]:
        raise ValueError(f"unlabeled_features have d = {unlabeled_features.shape[1]}, labeled_features "
                         f"d = {labeled_features.shape[1]}")
    for value, name in ((steps, "steps"), (batch_size, "batch_size"), (unlabeled_ratio, "unlabeled_ratio")):
        check_positive(value, name)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")

    head = copy_head(head)
    device = head.weight.device
    adjustment = (tau * log_prior(class_frequencies(labels, num_classes), "labeled class frequencies"))
    adjustment = adjustment.to(device, head.weight.dtype)
    feature_std = unlabeled_features.std(dim=0, unbiased=False) if len(unlabeled_features) > 1 \
        else torch.zeros_like(unlabeled_features[0])
    opt = torch.optim.SGD(param_groups(head, weight_decay), lr=lr, momentum=momentum, nesterov=momentum > 0)
    n_l, n_u = len(labeled_features), len(unlabeled_features)
    for step in range(steps):
        gen = generator(seed, "self_train", step)
        li = torch.randint(n_l, (batch_size,), generator=gen).to(labeled_features.device)
        ui = torch.randint(n_u, (batch_size * unlabeled_ratio,), generator=gen).to(unlabeled_features.device)
        weak = unlabeled_features[ui]
        strong = strong_view(weak, gen, dropout, noise_std, feature_std)
        for group in opt.param_groups:
            group["lr"] = lr * math.cos(7 * math.pi * step / (16 * steps))
        opt.zero_grad()
        loss, _ = fixmatch_la_loss(head, labeled_features[li].to(device), labels[li].to(device),
                                   weak.to(device), strong.to(device), adjustment,
                                   threshold=threshold, lambda_u=lambda_u)
        loss.backward()
        opt.step()
    return head
