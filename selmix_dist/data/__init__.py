"""Data layer: image sources, long-tailed splits, webdataset shards (and, elsewhere, backbones/features).

Heavy optional dependencies (``datasets``, ``webdataset``) are imported only when a source or writer that
needs them is used, so importing this package stays cheap.
"""

from __future__ import annotations

from selmix_dist.data.shards import shard_count_warning, write_shards
from selmix_dist.data.sources import (
    SOURCE_KINDS,
    ArraySource,
    HFDiskSource,
    ImageFolderSource,
    ImageSource,
    SplitListSource,
    WebDatasetSource,
    open_source,
)
from selmix_dist.data.splits import (
    SplitList,
    load_split,
    load_unlabeled_true_labels,
    long_tailed_counts,
    make_lt_split,
    open_split_source,
)

__all__ = [
    "SOURCE_KINDS",
    "ArraySource",
    "HFDiskSource",
    "ImageFolderSource",
    "ImageSource",
    "SplitList",
    "SplitListSource",
    "WebDatasetSource",
    "load_split",
    "load_unlabeled_true_labels",
    "long_tailed_counts",
    "make_lt_split",
    "open_source",
    "open_split_source",
    "shard_count_warning",
    "write_shards",
]
