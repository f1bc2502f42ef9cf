"""Evaluate a linear head on fixed features with the shared metric code of selmix_dist.core."""

from __future__ import annotations

import torch
from torch import nn

from selmix_dist.core.confusion import confusion_counts
from selmix_dist.core.metrics import compute_metrics, per_class_metrics
from selmix_dist.heads._inputs import check_head, check_labeled


@torch.no_grad()
def predict(head: nn.Linear, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """features float[N, d] -> argmax predictions int64[N] on features.device; batched so that an [N, K]
    logit matrix is never materialised (K can be in the thousands)."""
    device = head.weight.device
    out = [head(features[s:s + batch_size].to(device, head.weight.dtype)).argmax(dim=1).to(features.device)
           for s in range(0, len(features), batch_size)]
    return torch.cat(out)


def evaluate_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  head_mask: torch.Tensor | None = None, batch_size: int = 8192) -> dict:
    """features float[N, d], labels int64[N] in [0, K), head_mask bool[K] (head classes, optional)
    -> compute_metrics(counts, head=head_mask) plus "per_class_recall": list of K floats."""
    check_labeled(features, labels, num_classes)
    check_head(head, features.shape[1], num_classes)
    if head_mask is not None and (head_mask.dtype != torch.bool or head_mask.shape != (num_classes,)):
        raise ValueError(f"head_mask must be a bool tensor of shape [{num_classes}], got "
                         f"{head_mask.dtype} {tuple(head_mask.shape)}")
    counts = confusion_counts(labels.cpu(), predict(head, features, batch_size).cpu(), num_classes)
    result = dict(compute_metrics(counts, head=head_mask))
    result["per_class_recall"] = per_class_metrics(counts)["recall"].tolist()
    return result
