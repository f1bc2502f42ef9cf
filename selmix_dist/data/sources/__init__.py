"""Image sources: one small indexable interface over the on-disk formats the pipeline reads.

Every source is ``source[i] -> (PIL.Image in RGB mode, int label)`` with ``len(source)``,
``source.class_names`` (K names) and ``source.labels()`` -> int64[N] read without decoding any image.
Labels are validated once, when the source is opened: they lie in [0, K), or are −1 where a list is
explicitly unlabeled (``allow_unlabeled=True``). Images are decoded lazily, and a missing or corrupt image
raises ``FileNotFoundError`` / ``ValueError`` naming the file (and the shard for webdataset).

Kinds (``open_source(kind, path, **kw)``):
    imagefolder  ``root/<class>/**/*.jpg|jpeg|png``, classes = sorted sub-directory names
    splitlist    a text file of ``relative/path label`` lines (ImageNet-LT / iNaturalist style)
    webdataset   uncompressed tar shards of ``<key>.jpg|png`` + ``<key>.cls``, indexed by one tar scan
    hf           a Hugging Face ``datasets`` dataset written with ``save_to_disk``
    array        a ``.npz`` file with ``images`` uint8[N,H,W,C] or [N,H,W] and ``labels`` (``ArraySource``
                 also wraps in-memory arrays directly)

Sources backed by files expose ``root`` and ``paths`` (relative posix paths), so split lists can name
files instead of positions; ``raw(i)`` returns the stored encoded bytes when there are any, so shards can
be written without re-encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selmix_dist.data.sources.array import ArraySource
from selmix_dist.data.sources.base import IMAGE_EXTENSIONS, ImageSource, decode_image, read_list_file
from selmix_dist.data.sources.files import ImageFolderSource, SplitListSource
from selmix_dist.data.sources.hf import HFDiskSource
from selmix_dist.data.sources.webdataset import WDS_META, WebDatasetSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "ArraySource",
    "HFDiskSource",
    "ImageFolderSource",
    "ImageSource",
    "SplitListSource",
    "WDS_META",
    "WebDatasetSource",
    "decode_image",
    "open_source",
    "read_list_file",
]


SOURCE_KINDS: dict[str, Callable[..., ImageSource]] = {
    "imagefolder": ImageFolderSource,
    "splitlist": SplitListSource,
    "webdataset": WebDatasetSource,
    "hf": HFDiskSource,
    "array": ArraySource.from_npz,
}


def open_source(kind: str, path: str | Path | Sequence[str | Path], **kw: Any) -> ImageSource:
    """Open a source of ``kind`` (one of ``SOURCE_KINDS``) at ``path``; ``kw`` go to its constructor."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(SOURCE_KINDS)}")
    return SOURCE_KINDS[kind](path, **kw)
