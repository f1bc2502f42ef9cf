"""The post-hoc plug-in head: a trained head's logits plus per-class log-weights tuned on validation for a metric
(``core.plugin.fit_plugin``; docs/method.md §6). It is an ordinary ``nn.Linear`` with bias ``b + log g``, so
export, ``selmix_dist.load_classifier`` and ``tools/predict.py`` take it as they take any head."""

from __future__ import annotations

import torch
from torch import nn

from selmix_dist.core.objectives import Objective
from selmix_dist.core.plugin import PluginResult, fit_plugin
from selmix_dist.heads._inputs import check_head, check_labeled


@torch.no_grad()
def head_logits(head: nn.Linear, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """features float[N, d] -> float32 logits [N, K] on the CPU, in batches."""
    device = head.weight.device
    return torch.cat([head(features[s:s + batch_size].to(device, head.weight.dtype)).float().cpu()
                      for s in range(0, len(features), batch_size)])


def plugin_head(head: nn.Linear, log_weights: torch.Tensor) -> nn.Linear:
    """nn.Linear(d, K) and log-weights float[K] -> a new nn.Linear with the same weight and bias b + log g
    (a head without bias is treated as b = 0)."""
    check_head(head, head.in_features)
    if log_weights.shape != (head.out_features,):
        raise ValueError(f"log_weights must have shape [{head.out_features}] (one per class), "
                         f"got {tuple(log_weights.shape)}")
    out = nn.Linear(head.in_features, head.out_features, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(head.weight)
        bias = head.bias.detach().double() if head.bias is not None else torch.zeros_like(log_weights).double()
        out.bias.copy_(bias + log_weights.to(bias.device, torch.float64))
    return out


def fit_plugin_head(head: nn.Linear, val_features: torch.Tensor, val_labels: torch.Tensor, objective: Objective,
                    head_mask: torch.Tensor | None = None, **settings) -> tuple[nn.Linear, PluginResult]:
    """Tune the plug-in on validation features float[V, d] / labels int64[V] -> (plug-in head, result).
    ``settings``: fit_plugin's iterations, step, polish_sweeps, flip_points."""
    check_labeled(val_features, val_labels, head.out_features)
    result = fit_plugin(head_logits(head, val_features), val_labels.cpu(), objective, head=head_mask, **settings)
    return plugin_head(head, result.log_weights), result
