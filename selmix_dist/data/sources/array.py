"""Images held as arrays: in memory, or a `.npz` file of `images` and `labels`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selmix_dist.data.sources.base import ImageSource, _array_to_image, _check_labels, _resolve_names


class ArraySource(ImageSource):
    """In-memory images: uint8 [N,H,W,C] (C = 1, 3 or 4) or grey [N,H,W] (returned as RGB), labels [N].

    ``ArraySource.from_npz(path)`` (kind ``array``) reads ``images`` and ``labels`` from a ``.npz`` file and
    can be reopened from a split manifest; a source built from arrays in memory cannot (``spec()`` is None).
    """

    kind = "array"

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int],
                 *, class_names: Sequence[str] | None = None, num_classes: int | None = None):
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if images.dtype != np.uint8:
            raise ValueError(f"images: dtype {images.dtype}, expected uint8")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise ValueError(f"images: shape {images.shape}, expected [N,H,W] or [N,H,W,C], C in (1, 3, 4)")
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"labels: expected a 1-D integer array, got shape {labels.shape} "
                             f"dtype {labels.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
        self.images = images
        self._labels = labels.astype(np.int64)
        self.class_names = _resolve_names(class_names, num_classes, self._labels, "array source")
        self.npz_path: Path | None = None
        self._npz_keys = ("images", "labels")
        _check_labels(self._labels, self.num_classes, lambda i: f"labels[{i}]")

    @classmethod
    def from_npz(cls, path: str | Path, *, images_key: str = "images", labels_key: str = "labels",
                 class_names: Sequence[str] | None = None) -> ArraySource:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"array file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            for key in (images_key, labels_key):
                if key not in data:
                    raise ValueError(f"{path}: no array {key!r} (has {sorted(data.files)})")
            source = cls(data[images_key], data[labels_key], class_names=class_names)
        source.npz_path, source._npz_keys = path, (images_key, labels_key)
        return source

    def _load(self, i: int) -> Image.Image:
        return _array_to_image(self.images[i], f"images[{i}]")

    def spec(self) -> dict[str, Any] | None:
        if self.npz_path is None:
            return None
        options = {"images_key": self._npz_keys[0], "labels_key": self._npz_keys[1],
                   "class_names": list(self.class_names)}
        return {"kind": self.kind, "path": str(self.npz_path.resolve()), "options": options}

    def fingerprint(self) -> str:
        """sha256 over the label and image bytes (recorded for in-memory sources, which have no path)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self._labels).tobytes())
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()
