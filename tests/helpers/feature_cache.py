"""Feature caches written by the library's own writer (`extract_features`) from rows computed as a function
of the sample position instead of images through a network: for tests of the reader and for the scale
benchmarks (tools/bench_train.py puts tests/ on sys.path to import this module).

The files are exactly what an extraction writes (same chunking, metadata, checksums and manifest), because
they are written by it: only the backbone and the image source are stand-ins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from selmix_dist.features.cache import ExtractStats, extract_features


class PositionSource:
    """ImageSource protocol whose item i is its own position i (the "image") with its stored label."""

    def __init__(self, labels: torch.Tensor):
        self._labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, int(self._labels[i])

    def labels(self):
        return self._labels.numpy()


class FunctionBackbone(torch.nn.Module):
    """Stands in for a FrozenBackbone in `extract_features`: positions int64[B] -> rows(positions) float[B, d].

    `name` is the cache key's model name and weights digest, so two caches agree iff their names do.
    """

    def __init__(self, rows: Callable[[torch.Tensor], torch.Tensor], num_features: int, name: str):
        super().__init__()
        self.rows, self.num_features, self.name = rows, num_features, name
        self.weights_sha256 = hashlib.sha256(name.encode()).hexdigest()

    def transform(self, train: bool = False, normalize: bool = True) -> Callable[[int], torch.Tensor]:
        return lambda position: torch.tensor(position, dtype=torch.int64)

    def normalize(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def transform_description(self) -> str:
        return "position"

    def spec(self) -> dict:
        """How to rebuild it (recorded in the cache manifest; a table of rows cannot be rebuilt)."""
        return {"name": self.name, "weights": "table"}

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.rows(positions)


def write_feature_cache(out_dir: str | Path, split: str, labels: torch.Tensor,
                        rows: Callable[[torch.Tensor], torch.Tensor], num_features: int, *, name: str = "table",
                        dtype: str = "float16", chunk_size: int = 2048) -> ExtractStats:
    """Write (or, when already complete, keep) split `split` of the cache `out_dir`.

    labels int64[N]: the stored labels (−1 for an unlabeled split); rows(positions int64[B]) -> float[B, d]:
    the features of those positions (called once per chunk, with the chunk's positions in order).
    """
    return extract_features(PositionSource(labels), None, labels, FunctionBackbone(rows, num_features, name),
                            out_dir, split, batch_size=chunk_size, dtype=dtype, num_workers=0, device="cpu",
                            chunk_size=chunk_size, progress=False)
