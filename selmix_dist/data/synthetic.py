"""Synthetic long-tailed feature sets (Gaussian classes) for tests and scale benchmarks.

Generated deterministically from a seed in chunks, so an ImageNet-LT-sized set (hundreds of thousands of
rows × 1280) never needs more than the output tensors in memory.
"""

from __future__ import annotations

import torch

from selmix_dist.core.rng import generator
from selmix_dist.data.splits import long_tailed_counts


def long_tailed_class_counts(n_max: int, imbalance: float, num_classes: int) -> torch.Tensor:
    """int64[K] long-tailed counts (docs/method.md §1.2 rule), class 0 the head."""
    return torch.tensor(long_tailed_counts(n_max, imbalance, num_classes), dtype=torch.int64)




def class_means(num_classes: int, dim: int, seed: int, separation: float = 3.0) -> torch.Tensor:
    """float32[K, d] class centres with norm ≈ `separation`."""
    g = generator(seed, "class_means")
    return torch.randn(num_classes, dim, generator=g) * (separation / dim**0.5)


def gaussian_features(counts: torch.Tensor, means: torch.Tensor, seed: int, stream: str,
                      noise: float = 1.0, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Features float32[N, d] = means[y] + noise·N(0, I/d) and labels int64[N], classes in blocks.

    `stream` names the split so that splits drawn with the same seed are independent.
    """
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    d = means.shape[1]
    feats = torch.empty(len(labels), d, dtype=torch.float32)
    for start in range(0, len(labels), chunk):
        stop = min(start + chunk, len(labels))
        g = generator(seed, stream, start)
        feats[start:stop] = means[labels[start:stop]] + torch.randn(stop - start, d, generator=g) * (noise / d**0.5)
    return feats, labels
