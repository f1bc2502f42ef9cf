"""The feature cache answers to the split lists: a cached split is used only for the rows its list now names.

The split lists (`data.split_dir`) are what the user owns and may edit; the cache is derived from them. A
split whose list file still has the sha256 recorded at extraction is accepted at once. Otherwise (an edited
list, or a cache extracted from a whole source, whose split hash is one of its rows, not of a file) every
row is compared: count, label and item (source position, or source-relative path through the source the
list refers to), and the first difference is refused, naming the split, the row and both values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selmix_dist.data.splits import open_split_source, read_split_list
from selmix_dist.features.reader import CachedFeatures


def _fix(cache_dir: Path, split_dir: Path, path: Path) -> str:
    return (f"the feature cache {cache_dir} was not extracted from this version of {path}: restore the list, "
            f"or extract a cache of {split_dir} into a new directory (tools/extract_features.py --split-dir)")


def check_cache_against_list(reader: CachedFeatures, cache_dir: str | Path, split_dir: str | Path,
                             split: str) -> None:
    """ValueError unless cached split `split` (`reader`: labels int64[N], indices int64[N]) holds exactly the
    rows of split list `split` of `split_dir`, in order; the list's own errors (missing file, empty, label
    outside [0, K), a validation class without samples) come first, naming the file."""
    cache_dir, split_dir = Path(cache_dir), Path(split_dir)
    listed = read_split_list(split_dir, split)
    if listed.sha256 == reader.split_sha256:
        return
    path = split_dir / listed.manifest["lists"][split]["file"]
    labels, n = listed.labels, len(listed.labels)
    if n != len(reader):
        raise ValueError(f"split {split!r}: {path} lists {n} rows, the feature cache has {len(reader)}; "
                         + _fix(cache_dir, split_dir, path))
    differ = (labels != reader.labels).nonzero().flatten()
    if len(differ):
        row = int(differ[0])
        raise ValueError(f"split {split!r} row {row} ({listed.items[row]!r}): label {int(labels[row])} in {path}, "
                         f"{int(reader.labels[row])} in the feature cache; " + _fix(cache_dir, split_dir, path))
    record = listed.manifest["sources"][listed.manifest["lists"][split]["source"]]
    if record["items"] == "index":
        listed_items, cached_items = [int(i) for i in listed.items], reader.indices.tolist()
    else:
        # Paths name the rows: the cache stores source positions, so look them up in the list's source.
        source = open_split_source(split_dir, split)
        listed_items, cached_items = list(listed.items), [source.paths[i] for i in reader.indices.tolist()]
    differ = (torch.tensor([a != b for a, b in zip(listed_items, cached_items, strict=True)])
              .nonzero().flatten())
    if len(differ):
        row = int(differ[0])
        raise ValueError(f"split {split!r} row {row}: item {listed_items[row]!r} in {path}, "
                         f"{cached_items[row]!r} in the feature cache; " + _fix(cache_dir, split_dir, path))
