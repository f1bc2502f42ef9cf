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
    """Statistics of one split under the current head (this rank's shard, or global after `all_reduce`).

    counts: int64[K, K] confusion counts (rows true, columns predicted);
    feature_sums: float64[K, d] per-class feature sums (None when not requested).
    """

    counts: torch.Tensor
    feature_sums: torch.Tensor | None

    @property
    def class_counts(self) -> torch.Tensor:
        return self.counts.sum(1)

    def all_reduce(self) -> SplitStatistics:
        """Sums over ranks: every sample counted exactly once, identical on every rank."""
        sums = None if self.feature_sums is None else dist.all_reduce_sum(self.feature_sums)
        return SplitStatistics(dist.all_reduce_sum(self.counts), sums)

    def prototypes(self) -> torch.Tensor:
        """Class-mean features float64[K, d] (callers guarantee every class has a sample)."""
        return self.feature_sums / self.class_counts.clamp_min(1).to(torch.float64)[:, None]


def _shard_batches(n: int, batch_size: int):
    rank, world = dist.world_info()
    start, stop = dist.shard_bounds(n, rank, world)
    for first in range(start, stop, batch_size):
        yield torch.arange(first, min(first + batch_size, stop))


@torch.no_grad()
def local_split_statistics(head: torch.nn.Module, fs: FeatureSet, num_classes: int, batch_size: int,
                           device: torch.device, with_features: bool) -> SplitStatistics:
    """This rank's shard of `fs`: confusion counts and (optionally) per-class feature sums, on the CPU."""
    k = num_classes
    flat = torch.zeros(k * k, dtype=torch.int64, device=device)
    sums = torch.zeros(k, fs.num_features, dtype=torch.float64, device=device) if with_features else None
    for index in _shard_batches(len(fs), batch_size):
        x = fs.take(index).to(device)
        y = fs.labels[index].to(device)
        flat += torch.bincount(y * k + head(x).argmax(dim=1), minlength=k * k)
        if with_features:
            sums.index_add_(0, y, x.to(torch.float64))
    return SplitStatistics(flat.view(k, k).cpu(), None if sums is None else sums.cpu())


def split_statistics(head: torch.nn.Module, fs: FeatureSet, num_classes: int, batch_size: int,
                     device: torch.device, with_features: bool) -> SplitStatistics:
    """Global statistics of `fs` (sharded pass, then one reduction)."""
    return local_split_statistics(head, fs, num_classes, batch_size, device, with_features).all_reduce()


@torch.no_grad()
def local_pseudo_labels(head: torch.nn.Module, fs: FeatureSet, batch_size: int, device: torch.device,
                        threshold: float, log_prior: torch.Tensor | None) -> torch.Tensor:
    """Hard pseudo-labels int64[n_shard] of this rank's contiguous shard of an unlabeled split.

    argmax of logits − τ·log prior when `log_prior` (already scaled by τ) is given; −1 where the softmax
    confidence is below `threshold`.
    """
    parts = [torch.empty(0, dtype=torch.int64)]
    for index in _shard_batches(len(fs), batch_size):
        logits = head(fs.take(index).to(device)).to(torch.float64)
        if log_prior is not None:
            logits = logits - log_prior.to(logits.device)
        conf, label = logits.softmax(dim=1).max(dim=1)
        label[conf < threshold] = -1
        parts.append(label.cpu())
    return torch.cat(parts)


def gather_pseudo_labels(local: torch.Tensor) -> torch.Tensor:
    """All shards' pseudo-labels int64[N] on every rank; rank order is index order (contiguous shards)."""
    return dist.all_gather_cat(local)
