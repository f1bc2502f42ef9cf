"""Sharded passes over a split with the current head, reduced across ranks.

Each rank processes the contiguous slice `shard_bounds(N, rank, world)` of a split — disjoint, no padding —
and contributes its predictions and float64 per-class feature sums; a gather and an all-reduce make them
global, so every sample counts exactly once whatever the world size and every rank ends with the same
statistics. Every rank runs the same number of batches (an exhausted shard runs empty ones), so the
preemption poll after each batch is a collective at the same point on all ranks: a signal interrupts a
long pass within one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from selmix_dist import distributed as dist
from selmix_dist.core import compute_metrics, confusion_counts, per_class_metrics
from selmix_dist.features.sets import FeatureSet


class Interrupted(Exception):
    """A preemption poll asked a pass to stop (the caller checkpoints at the last step boundary)."""


Poll = Callable[[], bool]


def _never() -> bool:
    return False


@dataclass
class SplitStatistics:
    """Global statistics of one split under the current head, identical on every rank.

    counts: int64[K, K] confusion counts (rows true, columns predicted);
    feature_sums: float64[K, d] per-class feature sums (None when not requested);
    soft_counts: int64[K, K] Σ softmax(logits / T) over each true class's samples in units of 2⁻³² of a sample
        (None when not requested). Fixed point, so that the all-reduce is exact in any order and any world
        size gives the same sums; ``joint_confusion(soft_counts)`` is the soft C (docs/method.md §2.5).
    """

    counts: torch.Tensor
    feature_sums: torch.Tensor | None
    soft_counts: torch.Tensor | None = None


SOFT_UNIT = 2.0 ** 32   # one sample in soft_counts; N · 2³² stays below 2⁶³ for N < 2³¹


def _shard_batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    """This rank's batches of its shard; every rank yields the same number of batches (trailing ones empty)."""
    rank, world = dist.world_info()
    start, stop = dist.shard_bounds(n, rank, world)
    largest = -(-n // world)
    for first in range(start, start + max(largest, 1), batch_size):
        yield torch.arange(min(first, stop), min(first + batch_size, stop))


class Evaluator:
    """Passes of a head over the feature sets of one run, on `device`, `batch_size` rows at a time."""

    def __init__(self, num_classes: int, batch_size: int, device: torch.device, head_mask: torch.Tensor):
        self.k, self.batch_size, self.device, self.head_mask = num_classes, batch_size, device, head_mask

    @torch.no_grad()
    def statistics(self, head: torch.nn.Module, fs: FeatureSet, *, with_features: bool,
                   soft_temperature: float = 0.0, poll: Poll = _never) -> SplitStatistics:
        """Confusion counts (per-class feature sums; soft counts at `soft_temperature` > 0) of `fs` under
        `head`, over all ranks."""
        preds = [torch.empty(0, dtype=torch.int64, device=self.device)]  # kept on the device: one copy at the end
        sums = torch.zeros(self.k, fs.num_features, dtype=torch.float64, device=self.device) if with_features else None
        soft = torch.zeros(self.k, self.k, dtype=torch.int64, device=self.device) if soft_temperature > 0 else None
        for index in _shard_batches(len(fs), self.batch_size):
            if len(index):
                x = fs.take(index).to(self.device)
                logits = head(x)
                preds.append(logits.argmax(dim=1))
                labels = fs.labels[index].to(self.device)
                if with_features:
                    sums.index_add_(0, labels, x.to(torch.float64))
                if soft is not None:
                    p = (logits.to(torch.float64) / soft_temperature).softmax(dim=1)
                    soft.index_add_(0, labels, torch.round(p * SOFT_UNIT).to(torch.int64))
            if poll():
                raise Interrupted
        # Predictions are gathered (O(N) bytes rather than a K×K all-reduce, 530 MB at K = 8142) and counted
        # once on every rank; feature sums are all-reduced, and soft counts, which are dense, too.
        counts = confusion_counts(fs.labels, dist.all_gather_cat(torch.cat(preds).cpu()), self.k)
        return SplitStatistics(counts, None if sums is None else dist.all_reduce_sum(sums.cpu()),
                               None if soft is None else dist.all_reduce_sum(soft.cpu()))

    def metrics(self, counts: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """Every metric of the confusion counts, and the per-class recall float64[K]."""
        return compute_metrics(counts, head=self.head_mask), per_class_metrics(counts)["recall"]

    def evaluate(self, head: torch.nn.Module, fs: FeatureSet) -> tuple[dict[str, float], torch.Tensor]:
        return self.metrics(self.statistics(head, fs, with_features=False).counts)

    @torch.no_grad()
    def pseudo_labels(self, head: torch.nn.Module, fs: FeatureSet, *, threshold: float,
                      log_prior: torch.Tensor | None, poll: Poll = _never) -> torch.Tensor:
        """Hard pseudo-labels int32[N] of an unlabeled split, identical on every rank (one gather).

        argmax of logits − `log_prior` (already scaled by τ) when given; −1 where the softmax confidence is
        below `threshold`.
        """
        parts = [torch.empty(0, dtype=torch.int32, device=self.device)]
        for index in _shard_batches(len(fs), self.batch_size):
            if len(index):
                logits = head(fs.take(index).to(self.device)).to(torch.float64)
                if log_prior is not None:
                    logits = logits - log_prior.to(logits.device)
                conf, label = logits.softmax(dim=1).max(dim=1)
                label[conf < threshold] = -1
                parts.append(label.to(torch.int32))
            if poll():
                raise Interrupted
        return dist.all_gather_cat(torch.cat(parts).cpu())
