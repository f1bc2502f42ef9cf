"""Confusion matrices and the per-class rates derived from them.

Rows are true classes, columns predicted classes. ``counts`` is int64 ``[K, K]``; the joint matrix
``C = counts / counts.sum()`` is float64 and sums to 1 (scikit-learn's ``normalize="all"``).
The rate functions accept either form (they are scale free) and return 0, never NaN, where a rate is
undefined (a class with no sample, or never predicted).
"""

from __future__ import annotations

import math

import torch

from ._validate import check_finite, check_nonnegative, check_num_classes, check_square

__all__ = [
    "confusion_counts",
    "joint_confusion",
    "class_support",
    "recalls",
    "precisions",
    "coverages",
    "head_tail_masks",
]


def _check_class_vector(x: object, name: str, num_classes: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    x = x.to(torch.int64)
    bad = (x < 0) | (x >= num_classes)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{name}[{first}] = {int(x[first])} is outside [0, {num_classes}) ({int(bad.sum())} such entries)"
        )
    return x


def confusion_counts(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``[K, K]`` counts, ``counts[i, j] = #{n : labels[n] = i, preds[n] = j}``.

    ``labels`` and ``preds`` are integer ``[N]`` in ``[0, K)``; one ``bincount`` over ``labels * K + preds``.
    """
    k = check_num_classes(num_classes)
    labels = _check_class_vector(labels, "labels", k)
    preds = _check_class_vector(preds, "preds", k)
    if labels.shape != preds.shape:
        raise ValueError(f"labels has {labels.numel()} entries but preds has {preds.numel()}")
    preds = preds.to(labels.device)
    return torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def _as_float_matrix(matrix: torch.Tensor, name: str) -> torch.Tensor:
    check_square(matrix, name)
    check_finite(matrix, name)
    check_nonnegative(matrix, name)
    return matrix.to(torch.float64)


def joint_confusion(counts: torch.Tensor) -> torch.Tensor:
    """float64 ``[K, K]`` joint confusion ``counts / counts.sum()`` (sums to 1)."""
    c = _as_float_matrix(counts, "counts")
    total = c.sum()
    if total <= 0:
        raise ValueError("counts is all zero; a joint confusion matrix needs at least one sample")
    return c / total


def class_support(counts: torch.Tensor) -> torch.Tensor:
    """int64 ``[K]`` number of samples per true class (row sums)."""
    check_square(counts, "counts")
    check_nonnegative(counts, "counts")
    if counts.is_floating_point():
        raise ValueError("counts must be an integer matrix; use the row sums of C for a joint matrix")
    return counts.sum(dim=1).to(torch.int64)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0 where the denominator is 0: an undefined rate never propagates as NaN.
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def recalls(C: torch.Tensor) -> torch.Tensor:
    """float64 ``[K]``: ``C_ii / sum_j C_ij`` (0 for a class with no sample)."""
    c = _as_float_matrix(C, "C")
    return _safe_ratio(c.diagonal(), c.sum(dim=1))


def precisions(C: torch.Tensor) -> torch.Tensor:
    """float64 ``[K]``: ``C_jj / sum_i C_ij`` (0 for a class never predicted)."""
    c = _as_float_matrix(C, "C")
    return _safe_ratio(c.diagonal(), c.sum(dim=0))


def coverages(C: torch.Tensor) -> torch.Tensor:
    """float64 ``[K]``: fraction of all samples predicted as class j (column sums of the joint C)."""
    c = _as_float_matrix(C, "C")
    return _safe_ratio(c.sum(dim=0), c.sum().expand(c.shape[1]))


def head_tail_masks(
    train_counts: torch.Tensor, head_fraction: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head/tail split from training class frequencies.

    The ``floor(head_fraction * K)`` most frequent classes are the head (descending stable sort, so ties
    go to the lower class index); the rest are the tail. Returns ``(head bool[K], tail bool[K])``.
    """
    counts = torch.as_tensor(train_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"train_counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    check_finite(counts, "train_counts")
    check_nonnegative(counts, "train_counts")
    if not 0.0 < head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in (0, 1], got {head_fraction}")
    k = counts.numel()
    # round() first so that e.g. 0.9 * 30 = 27.000000000000004 or 26.999999999999996 both give 27.
    n_head = math.floor(round(head_fraction * k, 9))
    order = torch.sort(counts.cpu(), descending=True, stable=True).indices
    head = torch.zeros(k, dtype=torch.bool)
    head[order[:n_head]] = True
    return head.to(counts.device), ~head.to(counts.device)
