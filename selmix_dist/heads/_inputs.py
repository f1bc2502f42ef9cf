"""Boundary checks and small shared helpers for the baseline heads.

Everything here validates user-facing inputs once so the training loops can trust their tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from selmix_dist.core.schedule import cosine_factor


def check_features(features: torch.Tensor, name: str = "features") -> None:
    """features: float[N, d] with N >= 1; raises ValueError naming `name` otherwise."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape [N, d], got "
                         f"{getattr(features, 'shape', type(features))}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_labeled(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  name: str = "features") -> None:
    """features float[N, d], labels int64[N] in [0, num_classes). Unlabeled (-1) entries are rejected here:
    labeled-data APIs must not silently receive unlabeled samples."""
    check_features(features, name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels for {name} must be an int64 tensor of shape [N], got "
                         f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels for {name} have length {labels.shape[0]} but {name} has "
                         f"{features.shape[0]} rows")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"labels for {name} must lie in [0, {num_classes}); found "
                         f"{labels[bad][:5].tolist()} (unlabeled samples, label -1, are not accepted here)")


def check_head(head: nn.Linear, dim: int, num_classes: int | None = None) -> None:
    """head must be nn.Linear(dim, num_classes)."""
    if not isinstance(head, nn.Linear):
        raise ValueError(f"head must be torch.nn.Linear, got {type(head).__name__}")
    if head.in_features != dim:
        raise ValueError(f"head.in_features = {head.in_features} but the features have d = {dim}")
    if num_classes is not None and head.out_features != num_classes:
        raise ValueError(f"head.out_features = {head.out_features} but num_classes = {num_classes}")


def check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def class_frequencies(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels int64[N] -> float64[K] class frequencies (sum 1)."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return counts / counts.sum()


def log_prior(prior: torch.Tensor, what: str = "class prior") -> torch.Tensor:
    """prior float[K] (frequencies or counts, normalised here) -> float64[K] log pi.
    Logit adjustment needs pi > 0 for every class; a zero entry is an error naming the classes."""
    if prior.ndim != 1:
        raise ValueError(f"{what} must be a vector [K], got shape {tuple(prior.shape)}")
    prior = prior.to(torch.float64)
    zero = torch.nonzero(prior <= 0).flatten()
    if len(zero) or not torch.isfinite(prior).all():
        raise ValueError(f"{what} must be finite and > 0 for every class (logit adjustment takes log pi); "
                         f"non-positive for classes {zero[:10].tolist()}")
    return torch.log(prior / prior.sum())


def copy_head(head: nn.Linear) -> nn.Linear:
    """A detached copy, so that the baselines never modify the head they were given."""
    new = copy.deepcopy(head)
    new.requires_grad_(True)
    return new


def param_groups(head: nn.Linear, weight_decay: float) -> list[dict]:
    """SelMix's convention (docs/method.md §5.4): weight decay on the weight matrix only, never on the bias."""
    groups = [{"params": [head.weight], "weight_decay": weight_decay}]
    if head.bias is not None:
        groups.append({"params": [head.bias], "weight_decay": 0.0})
    return groups


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """Cosine annealing to 0 over `total` steps (value used for step `step`, 0-based)."""
    return base_lr * cosine_factor(step, total)
