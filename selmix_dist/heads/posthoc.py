"""Post-hoc logit adjustment (Menon et al., ICLR 2021) of a trained head.

The adjusted rule predicts argmax_k (w_k·x + b_k − tau log pi_k), which is the balanced-error Bayes rule when
the head estimates the training class posterior. It is a head with the same weight and bias b − tau log pi.
"""

from __future__ import annotations

import torch
from torch import nn

from selmix_dist.heads._inputs import check_head, log_prior


def posthoc_adjust(head: nn.Linear, class_prior: torch.Tensor, tau: float = 1.0) -> nn.Linear:
    """head nn.Linear(d, K), class_prior float[K] (training frequencies or counts, normalised here; all > 0)
    -> a new nn.Linear(d, K) with bias b − tau log pi (a head without bias is treated as b = 0)."""
    check_head(head, head.in_features)
    if class_prior.shape != (head.out_features,):
        raise ValueError(f"class_prior must have shape [{head.out_features}] (one entry per class), "
                         f"got {tuple(class_prior.shape)}")
    shift = tau * log_prior(class_prior, "class_prior")
    adjusted = nn.Linear(head.in_features, head.out_features, bias=True,
                         device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        adjusted.weight.copy_(head.weight)
        shift = shift.to(head.weight.device)
        bias = head.bias.detach().to(torch.float64) if head.bias is not None else torch.zeros_like(shift)
        adjusted.bias.copy_(bias - shift)
    return adjusted
