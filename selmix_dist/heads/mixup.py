"""Plain feature-mixup fine-tuning with uniformly drawn pairs (the non-selective baseline for SelMix).

Same mixup rule as SelMix (docs/method.md §5.2): for a pair (labeled sample x1 with label y1, partner x2) and
lambda ~ U[lambda_min, 1] per pair, train with CE(head(lambda x1 + (1 - lambda) x2), y1) — the label of the
dominant (labeled) sample, no label mixing. Here both members are drawn uniformly *per sample* (with
replacement) from their pools, i.e. pair classes follow the empirical (long-tailed) class frequencies; the
class-uniform P variant is the SelMix trainer with a uniform distribution. Optimiser as the SelMix release:
SGD without momentum, weight decay on the weight only, cosine learning rate over `steps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selmix_dist.core.rng import generator
from selmix_dist.heads._inputs import (
    check_features,
    check_head,
    check_labeled,
    check_positive,
    copy_head,
    cosine_lr,
    param_groups,
)


def draw_mixup_batch(num_labeled: int, num_partners: int, batch_size: int, gen: torch.Generator,
                     lambda_min: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (label_index int64[B] in [0, num_labeled), partner_index int64[B] in [0, num_partners),
    lam float32[B] ~ U[lambda_min, 1])."""
    label_index = torch.randint(num_labeled, (batch_size,), generator=gen)
    partner_index = torch.randint(num_partners, (batch_size,), generator=gen)
    lam = lambda_min + (1.0 - lambda_min) * torch.rand(batch_size, generator=gen)
    return label_index, partner_index, lam


def mixup_loss(head: nn.Linear, x1: torch.Tensor, x2: torch.Tensor, y1: torch.Tensor,
               lam: torch.Tensor) -> torch.Tensor:
    """x1, x2 float[B, d], y1 int64[B], lam float[B] -> mean CE(head(lam x1 + (1-lam) x2), y1)."""
    lam = lam.to(x1.dtype).unsqueeze(1)
    return F.cross_entropy(head(lam * x1 + (1.0 - lam) * x2), y1)


def mixup_finetune(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, partner_feats: torch.Tensor, *,
                   steps: int, batch_size: int = 64, lr: float = 3e-4, seed: int = 0,
                   weight_decay: float = 5e-4, lambda_min: float = 0.6) -> nn.Linear:
    """head nn.Linear(d, K) (copied, not modified); feats float[N, d] with labels int64[N] in [0, K);
    partner_feats float[M, d] (labeled or unlabeled — their labels are never needed) -> fine-tuned copy.
    Step t draws its batch with generator(seed, "mixup", t)."""
    check_labeled(feats, labels, head.out_features, "feats")
    check_features(partner_feats, "partner_feats")
    check_head(head, feats.shape[1])
    if partner_feats.shape[1] != feats.shape[1]:
        raise ValueError(f"partner_feats have d = {partner_feats.shape[1]}, feats d = {feats.shape[1]}")
    check_positive(steps, "steps")
    check_positive(batch_size, "batch_size")
    if not 0.0 <= lambda_min <= 1.0:
        raise ValueError(f"lambda_min must be in [0, 1], got {lambda_min}")

    head = copy_head(head)
    device = head.weight.device
    opt = torch.optim.SGD(param_groups(head, weight_decay), lr=lr, momentum=0.0)
    for step in range(steps):
        li, pi, lam = draw_mixup_batch(len(feats), len(partner_feats), batch_size,
                                       generator(seed, "mixup", step), lambda_min)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        opt.zero_grad()
        li_f, pi_f = li.to(feats.device), pi.to(partner_feats.device)
        mixup_loss(head, feats[li_f].to(device), partner_feats[pi_f].to(device), labels[li_f].to(device),
                   lam.to(device)).backward()
        opt.step()
    return head
