"""Reading one split of a feature cache (selmix_dist.features.cache) for training: rows on demand by `pread`.

    reader = open_features(cache_dir, "unlabeled")     # checks every chunk once, holds labels and indices
    x = reader.take(torch.tensor([7, 3, 7]))            # float32[3, d], read from the page cache

The ranks of a node share the page cache's one copy of the files; a rank holds only what it reads.
`load_features` copies a whole split into memory instead (small splits, tests).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selmix_dist.features.cache import CacheKey, complete_split
from selmix_dist.features.chunks import read_chunk

__all__ = ["CachedFeatures", "FeatureSplit", "load_features", "open_features"]


@dataclass
class FeatureSplit:
    """features float32[N,d], labels int64[N] (−1 = unlabeled), indices int64[N] (source positions)."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


# IEEE exponent bits: a float is inf or NaN exactly when they are all set.
_EXPONENT_MASK = {torch.float16: (np.uint16, 0x7C00), torch.float32: (np.uint32, 0x7F800000)}


def _first_nonfinite_row(features: torch.Tensor) -> int | None:
    """Index of the first row of `features` [n, d] (float16/float32) holding an inf or NaN, else None.

    Tests the exponent bits of the stored integers (10x faster than isfinite on float16).
    """
    bits, mask = _EXPONENT_MASK[features.dtype]
    bad = ((features.numpy().view(bits) & mask) == mask).any(axis=1)
    return int(bad.argmax()) if bad.any() else None


class CachedFeatures:
    """One split of a feature cache, read from the chunk files on demand by positional reads (`pread`).

    Features stay in the page cache as stored (float16 or float32): the ranks of a node share that one
    copy, and a process holds only the batches it reads. Reads rather than a memory map, because mapped
    pages a process has touched count in its RSS (and in its PSS share) until the map goes, so that a rank
    drawing partners from the whole pool would look as large as the pool. `take(index)` converts to
    float32 per batch. labels int64[N] (−1 = unlabeled) and indices int64[N] (source positions) are small
    and held in memory.
    """

    def __init__(self, files: list[tuple[Path, int]], starts: list[int], labels: torch.Tensor,
                 indices: torch.Tensor, num_features: int, dtype: torch.dtype, name: str, split_sha256: str = ""):
        """files: per chunk (path, byte offset of its features); starts: each chunk's first row;
        split_sha256: the split's hash recorded at extraction (of its list file, or of its rows)."""
        self.labels, self.indices, self.split_sha256 = labels, indices, split_sha256
        self.num_features, self.dtype, self.name = num_features, dtype, name
        self._paths = [path for path, _ in files]
        self._offsets = np.asarray([offset for _, offset in files], dtype=np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._row_bytes = num_features * self._np_dtype.itemsize
        self._fds = [os.open(path, os.O_RDONLY) for path in self._paths]
        weakref.finalize(self, _close_all, list(self._fds))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (int64[B], any order, repeats allowed) as float32[B, d]."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"split {self.name!r}: take needs a 1-D integer index, got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        rows = index.cpu().numpy().astype(np.int64, copy=False)
        if not len(rows):
            return torch.empty(0, self.num_features)
        if rows.min() < 0 or rows.max() >= len(self):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise IndexError(f"split {self.name!r}: row {bad} is outside [0, {len(self)})")
        unique, inverse = np.unique(rows, return_inverse=True)
        stored = np.empty((len(unique), self.num_features), dtype=self._np_dtype)
        chunk = np.searchsorted(self._starts, unique, side="right") - 1
        # One read per run of consecutive rows inside a chunk: a pass over a split is a few large reads, a
        # random batch one small read per row.
        cuts = np.flatnonzero((np.diff(unique) != 1) | (np.diff(chunk) != 0)) + 1
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(unique)].tolist(), strict=True):
            c = chunk[a]
            offset = int(self._offsets[c] + (unique[a] - self._starts[c]) * self._row_bytes)
            self._read_into(c, memoryview(stored[a:b]).cast("B"), offset)
        # One conversion of the whole batch: torch's is vectorised, numpy's float16 cast is 3x slower.
        out = torch.from_numpy(stored).to(torch.float32)
        return out if len(unique) == len(rows) and bool((unique == rows).all()) else out[torch.from_numpy(inverse)]

    def _read_into(self, chunk: int, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):   # a regular file may still return short reads (signals, > 2 GB)
            n = os.preadv(self._fds[chunk], [buffer[done:]], offset + done)
            if n == 0:
                raise ValueError(f"feature chunk {self._paths[chunk]} ended early (truncated after it was "
                                 "opened?)")
            done += n


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_features(cache_dir: str | Path, split: str, *, key: CacheKey | None = None,
                  split_sha256: str | None = None, verify: bool = True) -> CachedFeatures:
    """The cached split as a `CachedFeatures` reader (no copy of the features; rows are read on demand).

    key / split_sha256: when given, the cache must have been built with exactly these (ValueError
    listing the differing fields otherwise). Every chunk is scanned once, through a map that is dropped
    afterwards: its sha256 when `verify` (1.8 GB/s per core, i.e. about 3 s for 5 GB of float16 once the
    files are in the page cache), and always its rows for inf / NaN (ValueError naming the split, the row
    and the chunk file). A missing chunk raises FileNotFoundError, a corrupt one ValueError, naming the file.
    """
    cache_dir = Path(cache_dir)
    manifest, entry = complete_split(cache_dir, split, key, split_sha256)
    n, d = entry["num_samples"], manifest["num_features"]
    labels = torch.empty(n, dtype=torch.int64)
    indices = torch.empty(n, dtype=torch.int64)
    meta_base = {"key_digest": manifest["key_digest"], "split": split, "split_sha256": entry["split_sha256"]}
    files, starts, covered, dtype = [], [], 0, torch.float32
    for c in entry["chunks"]:
        path = cache_dir / split / c["file"]
        a, b = c["start"], c["stop"]
        if a != covered or not a < b <= n:
            raise ValueError(f"feature cache {cache_dir}: the chunks of split {split!r} do not tile [0, {n}) "
                             f"(chunk {c['file']})")
        expect = {**meta_base, "start": str(a), "stop": str(b), "sha256": c["sha256"]}
        scanned = read_chunk(path, expect, verify)
        found = {name: (str(t.dtype), tuple(t.shape)) for name, t in scanned.items()}
        wanted = {"features": (str(scanned["features"].dtype), (b - a, d)), "labels": ("torch.int64", (b - a,)),
                  "indices": ("torch.int64", (b - a,))}
        if found != wanted or scanned["features"].dtype not in _EXPONENT_MASK:
            raise ValueError(f"feature chunk {path} holds {found}, expected {wanted} with float16/float32 features")
        bad = _first_nonfinite_row(scanned["features"])
        if bad is not None:
            raise ValueError(f"split {split!r} of feature cache {cache_dir}: row {a + bad} has non-finite "
                             f"features (chunk {path})")
        labels[a:b], indices[a:b] = scanned["labels"], scanned["indices"]
        features = scanned["features"]  # a view of the file's map: where it starts is where rows are read
        dtype, offset = features.dtype, features.storage_offset() * features.element_size()
        # Unmap the scanned pages (they stay in the page cache, not in this process); rows are read later.
        del scanned, features
        files.append((path, offset))
        starts.append(a)
        covered = b
    if covered != n:
        raise ValueError(f"feature cache {cache_dir}: the chunks of split {split!r} do not tile [0, {n})")
    return CachedFeatures(files, starts, labels, indices, d, dtype, split, entry["split_sha256"])


def load_features(cache_dir: str | Path, split: str, *, key: CacheKey | None = None,
                  split_sha256: str | None = None, verify: bool = True) -> FeatureSplit:
    """The cached split copied into memory: float32 features [N,d] (upcast from float16), labels, indices.

    A private O(N·d) copy per process, for small splits and tests; training opens the cache with
    `open_features` instead (rows read on demand, one page-cache copy per node). Arguments and errors as there.
    """
    reader = open_features(cache_dir, split, key=key, split_sha256=split_sha256, verify=verify)
    return FeatureSplit(reader.take(torch.arange(len(reader))), reader.labels, reader.indices)
