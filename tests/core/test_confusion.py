from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_score, recall_score

from selmix_dist.core.confusion import (
    class_support,
    confusion_counts,
    coverages,
    head_tail_masks,
    joint_confusion,
    precisions,
    recalls,
)


def _random_case(seed: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, size=n, p=rng.dirichlet(np.ones(k)))
    # predictions right 60% of the time, otherwise a random class
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, size=n))
    return labels, preds


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 7), (2, 13)])
def test_counts_and_rates_match_sklearn(seed: int, k: int) -> None:
    labels, preds = _random_case(seed, k, 400)
    counts = confusion_counts(torch.from_numpy(labels), torch.from_numpy(preds), k)
    assert counts.dtype == torch.int64
    np.testing.assert_array_equal(counts.numpy(), confusion_matrix(labels, preds, labels=list(range(k))))

    joint = joint_confusion(counts)
    assert joint.dtype == torch.float64
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_array_equal(class_support(counts).numpy(), np.bincount(labels, minlength=k))

    kw = {"labels": list(range(k)), "average": None, "zero_division": 0}
    for matrix in (counts, joint):  # the rates are scale free
        np.testing.assert_allclose(recalls(matrix).numpy(), recall_score(labels, preds, **kw), rtol=1e-12)
        np.testing.assert_allclose(
            precisions(matrix).numpy(), precision_score(labels, preds, **kw), rtol=1e-12
        )
        np.testing.assert_allclose(coverages(matrix).numpy(), np.bincount(preds, minlength=k) / len(preds))


def test_rates_are_zero_not_nan_for_absent_classes() -> None:
    # class 2 never occurs and is never predicted; class 1 is predicted but never occurs
    labels = torch.tensor([0, 0, 3, 3, 3])
    preds = torch.tensor([0, 1, 3, 0, 1])
    counts = confusion_counts(labels, preds, 4)
    r, p, cov = recalls(counts), precisions(counts), coverages(counts)
    assert r.tolist() == [0.5, 0.0, 0.0, 1 / 3]
    assert p.tolist() == [0.5, 0.0, 0.0, 1.0]
    assert cov.tolist() == [0.4, 0.4, 0.0, 0.2]


def test_head_tail_masks_ties_and_sizes() -> None:
    # sorted descending with ties kept in index order: 0(3) 2(3) 4(2) 1(1) 3(1)
    head, tail = head_tail_masks(torch.tensor([3, 1, 3, 1, 2]), head_fraction=0.6)
    assert head.tolist() == [True, False, True, False, True]
    assert tail.tolist() == [not h for h in head.tolist()]
    # tie across the boundary: classes 1, 2, 3 all have 1 sample; the lowest index wins
    head, _ = head_tail_masks(torch.tensor([2, 1, 1, 1]), head_fraction=0.5)
    assert head.tolist() == [True, True, False, False]
    for k in (2, 10, 30, 100, 8142):
        counts = torch.randperm(k) + 1  # distinct counts, permuted class order
        head, _ = head_tail_masks(counts)
        n_head = (9 * k) // 10  # ⌊0.9K⌋ in exact integer arithmetic
        assert int(head.sum()) == n_head
        if n_head:  # every head class is at least as frequent as every tail class
            assert int(counts[head].min()) > int(counts[~head].max())


@pytest.mark.parametrize(
    "labels,preds,match",
    [
        ([0, 3], [0, 1], r"labels\[1\] = 3 is outside \[0, 3\)"),
        ([0, -1], [0, 1], r"labels\[1\] = -1"),
        ([0, 1], [0, 5], r"preds\[1\] = 5"),
        ([0, 1, 2], [0, 1], "labels has 3 entries but preds has 2"),
    ],
)
def test_confusion_counts_rejects_bad_labels(labels, preds, match) -> None:
    with pytest.raises(ValueError, match=match):
        confusion_counts(torch.tensor(labels), torch.tensor(preds), 3)


def test_bad_matrices_raise() -> None:
    with pytest.raises(ValueError, match="labels must be an integer"):
        confusion_counts(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_counts(torch.tensor([0]), torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="square"):
        joint_confusion(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="negative"):
        joint_confusion(torch.tensor([[1, -1], [0, 2]]))
    with pytest.raises(ValueError, match="all zero"):
        joint_confusion(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        recalls(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="head_fraction"):
        head_tail_masks(torch.tensor([3, 2, 1]), head_fraction=0.0)
