"""Sharded evaluation passes, reduced across ranks.

Each rank processes the contiguous slice `shard_bounds(N, rank, world)` of a split — disjoint, no padding —
and contributes integer counts and float64 sums; one all-reduce makes them global. So every sample is
counted exactly once whatever the world size, and every rank ends with the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selmix_dist import distributed as dist
from selmix_dist.train.featuresets import FeatureSet


@dataclass
class SplitStatistics:
    """Global statistics of one split under the current head.

    counts: int64[K, K] confusion counts (rows true, columns predicted);
    feature_sums: float64[K, d] per-class feature sums (None when not requested);
    class_counts: int64[K] samples per class.
    """

    counts: torch.Tensor
    feature_sums: torch.Tensor | None
    class_counts: torch.Tensor

    def prototypes(self) -> torch.Tensor:
        """Class-mean features float64[K, d] (callers guarantee every class has a sample)."""
        return self.feature_sums / self.class_counts.clamp_min(1).to(torch.float64)[:, None]


def _batches(n_start: int, n_stop: int, batch_size: int):
    for start in range(n_start, n_stop, batch_size):
        yield torch.arange(start, min(start + batch_size, n_stop))


@torch.no_grad()
def split_statistics(head: torch.nn.Module, fs: FeatureSet, num_classes: int, batch_size: int,
                     device: torch.device, with_features: bool) -> SplitStatistics:
    rank, world = dist.world_info()
    start, stop = dist.shard_bounds(len(fs), rank, world)
    k = num_classes
    flat = torch.zeros(k * k, dtype=torch.int64, device=device)
    sums = torch.zeros(k, fs.num_features, dtype=torch.float64, device=device) if with_features else None
    for index in _batches(start, stop, batch_size):
        x = fs.take(index).to(device)
        y = fs.labels[index].to(device)
        pred = head(x).argmax(dim=1)
        flat += torch.bincount(y * k + pred, minlength=k * k)
        if with_features:
            sums.index_add_(0, y, x.to(torch.float64))
    counts = dist.all_reduce_sum(flat).view(k, k)
    sums = dist.all_reduce_sum(sums) if with_features else None
    return SplitStatistics(counts.cpu(), None if sums is None else sums.cpu(), counts.sum(1).cpu())


@torch.no_grad()
def pseudo_labels(head: torch.nn.Module, fs: FeatureSet, batch_size: int, device: torch.device,
                  threshold: float, log_prior: torch.Tensor | None) -> torch.Tensor:
    """Hard pseudo-labels int64[N] of an unlabeled split, identical on every rank.

    Each rank labels its own shard with the current head (argmax of logits − τ·log prior when
    `log_prior` is given; −1 below the softmax confidence `threshold`), then the shards are gathered in
    rank order, which is index order because the shards are contiguous.
    """
    rank, world = dist.world_info()
    start, stop = dist.shard_bounds(len(fs), rank, world)
    parts = [torch.empty(0, dtype=torch.int64)]
    for index in _batches(start, stop, batch_size):
        logits = head(fs.take(index).to(device)).to(torch.float64)
        if log_prior is not None:
            logits = logits - log_prior.to(logits.device)
        conf, label = logits.softmax(dim=1).max(dim=1)
        label[conf < threshold] = -1
        parts.append(label.cpu())
    return dist.all_gather_cat(torch.cat(parts))
