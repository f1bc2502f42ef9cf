from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import gmean, hmean
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from selmix_dist.core.confusion import confusion_counts, head_tail_masks
from selmix_dist.core.metrics import METRIC_NAMES, compute_metrics, per_class_metrics


def _case(seed: int, k: int, n: int, absent: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.ones(k)) + 0.05
    prior[list(absent)] = 0.0
    labels = rng.choice(k, size=n, p=prior / prior.sum())
    preds = np.where(rng.random(n) < 0.55, labels, rng.integers(0, k, size=n))
    return labels, preds


def _counts(labels: np.ndarray, preds: np.ndarray, k: int) -> torch.Tensor:
    return confusion_counts(torch.from_numpy(labels), torch.from_numpy(preds), k)


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 8), (2, 20)])
def test_metrics_match_sklearn_scipy(seed: int, k: int) -> None:
    labels, preds = _case(seed, k, 3000)
    assert len(np.unique(labels)) == k  # every class present in this case
    rng = np.random.default_rng(seed + 100)
    head, tail = head_tail_masks(torch.from_numpy(rng.integers(1, 500, size=k)))
    m = compute_metrics(_counts(labels, preds, k), head=head)
    assert tuple(m) == METRIC_NAMES
    r = recall_score(labels, preds, labels=list(range(k)), average=None)
    cov = np.bincount(preds, minlength=k) / len(preds)
    hm, tm = head.numpy(), tail.numpy()
    expected = {
        "accuracy": accuracy_score(labels, preds),
        "mean_recall": balanced_accuracy_score(labels, preds),
        "min_recall": r.min(),
        "head_recall": r[hm].mean(),
        "tail_recall": r[tm].mean(),
        "min_head_tail_recall": min(r[hm].mean(), r[tm].mean()),
        "h_mean": hmean(r),
        "g_mean": gmean(r),
        "min_coverage": cov.min(),
        "head_coverage": cov[hm].mean(),
        "tail_coverage": cov[tm].mean(),
        "coverage_violation": max(0.0, max(0.95 / k - c for c in cov)),
        "macro_f1": f1_score(labels, preds, labels=list(range(k)), average="macro"),
        "empty_classes": 0,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_empty_class_convention() -> None:
    k = 6
    labels, preds = _case(3, k, 2000, absent=(1, 4))
    # make sure the absent classes are predicted sometimes (they still have a coverage)
    preds[:20] = 1
    m = compute_metrics(_counts(labels, preds, k))
    present = sorted(set(labels.tolist()))
    assert present == [0, 2, 3, 5]
    r = recall_score(labels, preds, labels=present, average=None)
    assert m["empty_classes"] == 2
    # sklearn's balanced accuracy also averages over the classes present in y_true only
    assert m["mean_recall"] == pytest.approx(balanced_accuracy_score(labels, preds), rel=1e-12)
    assert m["min_recall"] == pytest.approx(r.min(), rel=1e-12)
    assert m["h_mean"] == pytest.approx(hmean(r), rel=1e-12)
    assert m["g_mean"] == pytest.approx(gmean(r), rel=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, labels=present, average="macro"), rel=1e-12)
    assert m["min_coverage"] == pytest.approx(np.bincount(preds, minlength=k).min() / len(preds))
    assert not any(math.isnan(v) for v in m.values())


def test_zero_recall_and_all_head_empty() -> None:
    # class 2 is present but never predicted correctly: H-mean and G-mean are 0 (as scipy's)
    counts = torch.tensor([[5, 1, 0], [2, 4, 0], [3, 0, 0]])
    m = compute_metrics(counts, head=torch.tensor([True, False, False]))
    r = [5 / 6, 4 / 6, 0.0]
    assert m["h_mean"] == hmean(r) == 0.0
    assert m["g_mean"] == 0.0 and gmean(r) == pytest.approx(0.0)
    assert m["min_recall"] == 0.0
    assert m["head_recall"] == pytest.approx(5 / 6)
    assert m["tail_recall"] == pytest.approx((4 / 6 + 0.0) / 2)
    # the head class has no sample: head recall is an empty aggregate (0) and is left out of the min
    counts = torch.tensor([[0, 0, 0], [2, 4, 0], [3, 0, 1]])
    m = compute_metrics(counts, head=torch.tensor([True, False, False]))
    assert m["head_recall"] == 0.0
    assert m["min_head_tail_recall"] == pytest.approx((4 / 6 + 1 / 4) / 2)
    assert m["empty_classes"] == 1
    assert not any(math.isnan(v) for v in m.values())


def test_per_class_metrics_hand_computed() -> None:
    counts = torch.tensor([[3, 1], [2, 4]])
    per = per_class_metrics(counts)
    assert per["recall"].tolist() == pytest.approx([3 / 4, 4 / 6])
    assert per["precision"].tolist() == pytest.approx([3 / 5, 4 / 5])
    assert per["coverage"].tolist() == pytest.approx([5 / 10, 5 / 10])
    assert per["f1"].tolist() == pytest.approx([2 * 3 / (2 * 3 + 2 + 1), 2 * 4 / (2 * 4 + 1 + 2)])
    assert per["support"].tolist() == [4, 6] and per["support"].dtype == torch.int64


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        compute_metrics(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="negative"):
        compute_metrics(torch.tensor([[1, -2], [0, 1]]))
    with pytest.raises(ValueError, match="all zero"):
        compute_metrics(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="head"):
        compute_metrics(torch.eye(3, dtype=torch.int64), head=torch.tensor([True, False]))
