from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from selmix_dist.core.sampler import PairSampler

K = 5
# class c has LABEL_SIZES[c] labeled samples and PARTNER_SIZES[c] partner samples, shuffled
LABEL_SIZES = [7, 3, 1, 4, 2]
PARTNER_SIZES = [2, 5, 3, 1, 6]


def _classes(sizes: list[int], seed: int) -> torch.Tensor:
    classes = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))]


def _random_p(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(K, K, generator=g, dtype=torch.float64)
    p[p < 0.25] = 0.0  # some pairs have no mass
    return p / p.sum()


def test_pair_frequencies_follow_p() -> None:
    labels, partners = _classes(LABEL_SIZES, 0), _classes(PARTNER_SIZES, 1)
    sampler = PairSampler(labels, partners, K)
    P = _random_p(2)
    sampler.set_distribution(P)
    batches = [sampler.sample(4000, seed=123, rank=0, step=s) for s in range(5)]
    lab_cls = torch.cat([b.label_class for b in batches])
    par_cls = torch.cat([b.partner_class for b in batches])
    lab_idx = torch.cat([b.label_index for b in batches])
    par_idx = torch.cat([b.partner_index for b in batches])
    # the indices point at samples of the drawn classes
    assert torch.equal(labels[lab_idx], lab_cls) and torch.equal(partners[par_idx], par_cls)
    n = len(lab_cls)
    observed = torch.bincount(lab_cls * K + par_cls, minlength=K * K).double()
    support = P.flatten() > 0
    assert float(observed[~support].sum()) == 0  # zero-mass pairs are never drawn
    result = chisquare(observed[support].numpy(), (n * P.flatten()[support]).numpy())
    assert result.pvalue > 1e-3
    # within a class every member is equally likely
    members = lab_idx[lab_cls == 0]
    counts = torch.bincount(members, minlength=len(labels))[labels == 0].double().numpy()
    assert chisquare(counts).pvalue > 1e-3


def test_same_seed_rank_step_repeat_and_others_differ() -> None:
    sampler = PairSampler(_classes(LABEL_SIZES, 0), _classes(PARTNER_SIZES, 1), K)
    sampler.set_distribution(_random_p(3))
    first = sampler.sample(256, seed=7, rank=1, step=10)
    again = sampler.sample(256, seed=7, rank=1, step=10)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for other in (
        sampler.sample(256, seed=7, rank=2, step=10),
        sampler.sample(256, seed=7, rank=1, step=11),
        sampler.sample(256, seed=8, rank=1, step=10),
    ):
        assert not torch.equal(first.label_index, other.label_index)
    # a fresh sampler over the same data and P reproduces the batch: no hidden state
    fresh = PairSampler(_classes(LABEL_SIZES, 0), _classes(PARTNER_SIZES, 1), K)
    fresh.set_distribution(_random_p(3))
    assert torch.equal(fresh.sample(256, seed=7, rank=1, step=10).partner_index, first.partner_index)


def test_empty_buckets_leave_the_support() -> None:
    labels = _classes([4, 0, 3, 2, 5], 0)  # no labeled sample of class 1
    partners = _classes([3, 2, 2, 4, 0], 1)  # no partner of class 4
    partners = torch.cat([partners, torch.tensor([-1, -1])])  # unlabeled, no pseudo-label: never drawn
    sampler = PairSampler(labels, partners, K)
    P = torch.full((K, K), 1.0, dtype=torch.float64)
    sampler.set_distribution(P)
    expected = torch.ones(K, K, dtype=torch.float64)
    expected[1, :] = 0
    expected[:, 4] = 0
    torch.testing.assert_close(sampler.probabilities, expected / expected.sum(), rtol=1e-15, atol=0)
    batch = sampler.sample(3000, seed=0, rank=0, step=0)
    assert not bool((batch.label_class == 1).any()) and not bool((batch.partner_class == 4).any())
    assert bool((partners[batch.partner_index] >= 0).all())
    # all the mass on impossible pairs: uniform over the possible ones instead of a division by zero
    P = torch.zeros(K, K, dtype=torch.float64)
    P[1, 0] = P[0, 4] = 1.0
    sampler.set_distribution(P)
    torch.testing.assert_close(sampler.probabilities, expected / expected.sum(), rtol=1e-15, atol=0)


def test_no_possible_pair_raises() -> None:
    sampler = PairSampler(torch.tensor([0, 1]), torch.tensor([-1, -1, -1]), 3)
    with pytest.raises(ValueError, match="no allowed pair"):
        sampler.set_distribution(torch.ones(3, 3))


def test_more_pairs_than_multinomial_supports() -> None:
    k = 4200  # K² = 17.6M > 2^24 categories
    classes = torch.arange(k)
    sampler = PairSampler(classes, classes, k)
    P = torch.zeros(k, k, dtype=torch.float64)
    P[k - 1, k - 2] = 3.0  # beyond flat index 2^24
    P[0, 1] = 1.0
    sampler.set_distribution(P)
    batch = sampler.sample(4000, seed=1, rank=0, step=0)
    pairs = set(zip(batch.label_class.tolist(), batch.partner_class.tolist(), strict=True))
    assert pairs == {(k - 1, k - 2), (0, 1)}
    share = float((batch.label_class == k - 1).double().mean())
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"label_classes\[1\] = 5 is outside"):
        PairSampler(torch.tensor([0, 5]), torch.tensor([0]), 5)
    with pytest.raises(ValueError, match="partner_classes must be a 1-D integer"):
        PairSampler(torch.tensor([0]), torch.tensor([0.5]), 5)
    sampler = PairSampler(torch.tensor([0, 1]), torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="set_distribution"):
        sampler.sample(4, seed=0, rank=0, step=0)
    with pytest.raises(ValueError, match="P has K=3"):
        sampler.set_distribution(torch.ones(3, 3))
    with pytest.raises(ValueError, match="negative"):
        sampler.set_distribution(-torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        sampler.set_distribution(torch.full((2, 2), float("nan")))
    sampler.set_distribution(torch.ones(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0, seed=0, rank=0, step=0)
