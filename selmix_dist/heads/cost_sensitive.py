"""Cost-sensitive fine-tuning of a head for objectives linear in C (CSST-style, Rangwani et al. 2022).

Every `refresh_every` steps, on the validation features:
  1. hard predictions -> counts -> joint confusion C (sums to 1) and objective.update_multipliers(C)
     (core.update_objective, the first half of a SelMix refresh); Psi = objective.gradient(C) (= the gain
     matrix of the Lagrangian, constant in C for linear objectives);
  2. training gain  G = diag(rho / pi) · canon(Psi), where rho = validation class priors (row sums of C),
     pi = labeled training class frequencies, and canon subtracts from each row of Psi the minimum of its
     off-diagonal entries. Row sums of C are fixed by the data, so adding a constant to a row of Psi does
     not change which classifier is best; canon makes the off-diagonal entries >= 0 (what the hybrid loss
     needs) and removes the -C_ii/rho_i^2 terms of a recall differentiated through its own row sum. The
     diag(rho/pi) factor re-expresses a gain on the validation distribution as one on the training
     distribution. Diagonal entries are floored at 1e-12 · max diagonal (classes absent from validation or
     training) so that log G_ii stays finite. A positive rescaling of Psi (e.g. 1/(1 + max lambda)) cancels.
  3. train with the hybrid logit-adjusted cost-sensitive loss of Narasimhan & Menon (2021)
        loss(y, f) = - sum_i (G_yi / G_ii) log softmax(f - log diag(G))_i        (losses.py)
     For mean recall (Psi = I, balanced validation) this is exactly logit-adjusted CE with tau = 1; for min
     recall (Psi = K diag(lambda)) it is CE(f + log pi - log lambda, y); coverage multipliers lambda_j add
     lambda_j to column j, i.e. soft targets on the constrained classes.
Optionally (`unlabeled_features`), CSST's self-training term: lambda_u · mean_u 1{conf >= threshold} ·
hybrid_loss(f(strong_u), pseudo_u), pseudo-labels = argmax of the plain logits on the weak view (CSST masks by
a KL divergence to the gain row instead of the confidence — a deliberate simplification). Test-time rule:
argmax of the plain logits. SGD with Nesterov momentum, weight decay on the weight only, cosine lr.
Step t draws its batch with generator(seed, "cost_sensitive", t).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from selmix_dist.core.confusion import confusion_counts
from selmix_dist.core.objectives import CLAMP_MIN
from selmix_dist.core.refresh import update_objective
from selmix_dist.core.rng import generator
from selmix_dist.heads._inputs import (
    check_features,
    check_head,
    check_labeled,
    check_positive,
    class_frequencies,
    copy_head,
    cosine_lr,
    param_groups,
)
from selmix_dist.heads.evaluate import predict
from selmix_dist.heads.losses import hybrid_cost_sensitive_loss
from selmix_dist.heads.selftrain import pseudo_labels, strong_view

DIAGONAL_FLOOR = 1e-12


def cost_sensitive_gain(psi: torch.Tensor, val_prior: torch.Tensor,
                        train_prior: torch.Tensor) -> torch.Tensor:
    """psi float[K, K] (= dpsi/dC on the validation joint confusion), val_prior float[K], train_prior float[K]
    -> training gain G float64[K, K]: off-diagonal >= 0, diagonal > 0 (see the module docstring)."""
    psi = psi.to(torch.float64)
    k = psi.shape[0]
    if psi.shape != (k, k) or k < 2 or val_prior.shape != (k,) or train_prior.shape != (k,):
        raise ValueError(f"psi must be [K, K] with K >= 2 and both priors [K]; got {tuple(psi.shape)}, "
                         f"{tuple(val_prior.shape)}, {tuple(train_prior.shape)}")
    if not torch.isfinite(psi).all():
        raise ValueError("the objective's gradient contains NaN or infinite entries")
    eye = torch.eye(k, dtype=torch.bool, device=psi.device)
    row_min = psi.masked_fill(eye, float("inf")).min(dim=1).values
    gain = psi - row_min.unsqueeze(1)
    train_prior = train_prior.to(psi)
    ratio = torch.where(train_prior > 0, val_prior.to(psi) / train_prior.clamp_min(1e-300), 0.0)
    gain = gain * ratio.unsqueeze(1)
    diag = torch.diagonal(gain)
    top = diag.max()
    if not top > 0:
        raise ValueError("cost-sensitive gain has no positive diagonal entry: the objective's gradient "
                         "rewards no correct prediction more than a mistake")
    gain[eye] = diag.clamp_min(DIAGONAL_FLOOR * top)
    return gain


@dataclass
class CostSensitiveResult:
    head: nn.Linear
    history: list[dict] = field(default_factory=list)  # per refresh: {"step", "multipliers", "gain_diagonal"}


def cost_sensitive_finetune(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
                            val_features: torch.Tensor, val_labels: torch.Tensor, objective, *, steps: int,
                            batch_size: int = 64, lr: float = 0.01, momentum: float = 0.9,
                            weight_decay: float = 5e-4, refresh_every: int = 50, seed: int = 0,
                            unlabeled_features: torch.Tensor | None = None, unlabeled_ratio: int = 2,
                            threshold: float = 0.95, lambda_u: float = 1.0, dropout: float = 0.3,
                            noise_std: float = 0.1) -> CostSensitiveResult:
    """head nn.Linear(d, K) (copied, not modified); features float[N, d], labels int64[N]; val_features
    float[V, d], val_labels int64[V]; objective: a selmix_dist.core Objective with num_classes K;
    unlabeled_features float[U, d] or None -> CostSensitiveResult(fine-tuned head, refresh history)."""
    k = head.out_features
    check_labeled(features, labels, k, "features")
    check_labeled(val_features, val_labels, k, "val_features")
    check_head(head, features.shape[1], k)
    if getattr(objective, "num_classes", None) != k:
        raise ValueError(f"objective.num_classes = {getattr(objective, 'num_classes', None)} but the head "
                         f"has K = {k} classes")
    if unlabeled_features is not None:
        check_features(unlabeled_features, "unlabeled_features")
    for value, name in ((steps, "steps"), (batch_size, "batch_size"), (refresh_every, "refresh_every")):
        check_positive(value, name)

    head = copy_head(head)
    device = head.weight.device
    train_prior = class_frequencies(labels, k)
    feature_std = None
    if unlabeled_features is not None:
        feature_std = unlabeled_features.std(dim=0, unbiased=False)
    opt = torch.optim.SGD(param_groups(head, weight_decay), lr=lr, momentum=momentum, nesterov=momentum > 0)
    result = CostSensitiveResult(head)
    gain = None
    for step in range(steps):
        if step % refresh_every == 0:
            counts = confusion_counts(val_labels.cpu(), predict(head, val_features).cpu(), k)
            joint = update_objective(counts, objective)
            # Psi is taken at clamp(C, CLAMP_MIN) (objectives.py), so its row sums are the matching priors.
            val_prior = joint.clamp_min(CLAMP_MIN).sum(dim=1)
            gain = cost_sensitive_gain(objective.gradient(joint), val_prior, train_prior).to(device)
            result.history.append({"step": step,
                                   "multipliers": {n: t.detach().cpu().clone()
                                                   for n, t in objective.multipliers().items()},
                                   "gain_diagonal": torch.diagonal(gain).cpu().clone()})
        gen = generator(seed, "cost_sensitive", step)
        idx = torch.randint(len(features), (batch_size,), generator=gen).to(features.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        opt.zero_grad()
        loss = hybrid_cost_sensitive_loss(head(features[idx].to(device)), labels[idx].to(device), gain)
        if unlabeled_features is not None:
            ui = torch.randint(len(unlabeled_features), (batch_size * unlabeled_ratio,), generator=gen)
            weak = unlabeled_features[ui.to(unlabeled_features.device)]
            strong = strong_view(weak, gen, dropout, noise_std, feature_std).to(device)
            with torch.no_grad():
                targets, confident = pseudo_labels(head(weak.to(device)), threshold)
            if confident.any():
                # Masked samples count in the denominator, as in FixMatch.
                unsup = hybrid_cost_sensitive_loss(head(strong[confident]), targets[confident], gain)
                loss = loss + lambda_u * unsup * confident.to(loss.dtype).mean()
        loss.backward()
        opt.step()
    return result
