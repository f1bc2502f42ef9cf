"""Scalar evaluation metrics of a confusion matrix.

Convention for classes with no sample in the evaluated split ("empty" classes, row sum 0): their recall is
undefined, so they are **excluded** from every recall-based aggregate (mean/min recall, head/tail recall,
H-mean, G-mean, macro-F1) and counted in ``empty_classes``. Coverages are defined for every class and use
all K. An aggregate over an empty set of classes is 0.0. No NaN is ever returned; H-mean and G-mean are 0
when a present class has recall 0.
"""

from __future__ import annotations

import torch

from ._validate import check_bool_mask
from .confusion import _as_float_matrix, _safe_ratio

__all__ = ["METRIC_NAMES", "compute_metrics", "per_class_metrics"]

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "mean_recall",
    "min_recall",
    "head_recall",
    "tail_recall",
    "min_head_tail_recall",
    "h_mean",
    "g_mean",
    "min_coverage",
    "head_coverage",
    "tail_coverage",
    "coverage_violation",
    "macro_f1",
    "empty_classes",
)


def per_class_metrics(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class rates of a ``[K, K]`` confusion matrix (counts or joint).

    Returns float64 ``[K]`` tensors ``recall``, ``precision``, ``coverage``, ``f1`` (0 where undefined) and
    ``support`` (row sums; int64 for an integer input, float64 otherwise).
    """
    c = _as_float_matrix(counts, "counts")
    diag, rows, cols = c.diagonal(), c.sum(dim=1), c.sum(dim=0)
    support = counts.sum(dim=1) if not counts.is_floating_point() else rows
    return {
        "recall": _safe_ratio(diag, rows),
        "precision": _safe_ratio(diag, cols),
        "coverage": _safe_ratio(cols, c.sum().expand_as(cols)),
        # 2TP / (2TP + FP + FN): the harmonic mean of precision and recall, 0 when both are undefined.
        "f1": _safe_ratio(2 * diag, rows + cols),
        "support": support,
    }


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


def _min(x: torch.Tensor) -> float:
    return float(x.min()) if x.numel() else 0.0


def _h_mean(r: torch.Tensor) -> float:
    if r.numel() == 0 or bool((r <= 0).any()):
        return 0.0
    return float(r.numel() / (1.0 / r).sum())


def _g_mean(r: torch.Tensor) -> float:
    # log space: a product of thousands of recalls would underflow.
    if r.numel() == 0 or bool((r <= 0).any()):
        return 0.0
    return float(torch.exp(torch.log(r).mean()))


def compute_metrics(
    counts: torch.Tensor, head: torch.Tensor | None = None, coverage_alpha: float = 0.95
) -> dict[str, float]:
    """Scalar metrics of a ``[K, K]`` confusion matrix (int64 counts; a joint float matrix also works).

    ``head`` (bool ``[K]``) adds ``head_recall``/``tail_recall`` (mean recall over the present head/tail
    classes), ``min_head_tail_recall`` (min of the two over the groups with a present class),
    ``head_coverage``/``tail_coverage`` (mean coverage over head/tail classes).
    ``coverage_violation = max_j max(0, coverage_alpha / K - coverage_j)`` measures the per-class coverage
    constraint of the coverage objectives (0 when satisfied).
    """
    c = _as_float_matrix(counts, "counts")
    k = c.shape[0]
    total = c.sum()
    if total <= 0:
        raise ValueError("counts is all zero; metrics need at least one sample")
    per = per_class_metrics(counts)
    present = c.sum(dim=1) > 0
    r = per["recall"][present]
    cov = per["coverage"]
    out: dict[str, float] = {
        "accuracy": float(c.diagonal().sum() / total),
        "mean_recall": _mean(r),
        "min_recall": _min(r),
        "h_mean": _h_mean(r),
        "g_mean": _g_mean(r),
        "min_coverage": float(cov.min()),
        "coverage_violation": float((coverage_alpha / k - cov).clamp_min(0).max()),
        "macro_f1": _mean(per["f1"][present]),
        "empty_classes": int((~present).sum()),
    }
    if head is not None:
        head = check_bool_mask(head, "head", k).to(c.device)
        tail = ~head
        head_r, tail_r = per["recall"][head & present], per["recall"][tail & present]
        group_means = [_mean(x) for x in (head_r, tail_r) if x.numel()]
        out.update(
            head_recall=_mean(head_r),
            tail_recall=_mean(tail_r),
            min_head_tail_recall=min(group_means) if group_means else 0.0,
            head_coverage=_mean(cov[head]),
            tail_coverage=_mean(cov[tail]),
        )
    return {name: out[name] for name in METRIC_NAMES if name in out}
