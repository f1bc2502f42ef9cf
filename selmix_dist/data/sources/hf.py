"""A Hugging Face `datasets` dataset written with `save_to_disk`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selmix_dist.data.sources.base import (
    _SHARD_FORMATS,
    ImageSource,
    _array_to_image,
    _check_labels,
    _image_format,
    _resolve_names,
    decode_image,
)


class HFDiskSource(ImageSource):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a Dataset, or a DatasetDict plus
    ``split``). Class names from the label column's ``ClassLabel`` if present, else ``class_names``, else
    ``class_<k>``. String labels are mapped through the class names.
    """

    kind = "hf"

    def __init__(self, path: str | Path, *, split: str | None = None, image_column: str = "image",
                 label_column: str = "label", class_names: Sequence[str] | None = None):
        import datasets

        self.path, self.split = Path(path), split
        self.image_column, self.label_column = image_column, label_column
        if not self.path.is_dir():
            raise FileNotFoundError(f"Hugging Face dataset directory not found: {self.path}")
        try:
            ds = datasets.load_from_disk(str(self.path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"cannot load Hugging Face dataset from {self.path}: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                what = "no split was named" if split is None else f"it has no split {split!r}"
                raise ValueError(f"{self.path} is a Hugging Face DatasetDict with splits {sorted(ds)} and {what}: "
                                 f"open it with split=NAME (command line: --option split={sorted(ds)[0]}, "
                                 f"or --test-option for --test-source)")
            ds = ds[split]
        elif split is not None:
            raise ValueError(f"{self.path} is a single Hugging Face Dataset, not a DatasetDict: split={split!r} "
                             "does not apply (drop --option split=...)")
        for field, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in ds.column_names:
                raise ValueError(f"{self.path}: {field} {column!r} not among the columns {ds.column_names}")
        feature = ds.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            if class_names is not None and list(class_names) != list(feature.names):
                raise ValueError(f"{self.path}: class_names differ from the ClassLabel names "
                                 f"of {label_column!r}")
            class_names = feature.names
        raw_labels = np.asarray(ds.with_format("numpy")[label_column])
        if raw_labels.dtype.kind in "USO":
            if class_names is None:
                raise ValueError(f"{self.path}: column {label_column!r} holds class names; pass class_names")
            ids = {n: k for k, n in enumerate(class_names)}
            unknown = [(r, v) for r, v in enumerate(raw_labels.tolist()) if v not in ids]
            if unknown:
                raise ValueError(f"{self.path}: unknown class name {unknown[0][1]!r} in row {unknown[0][0]} "
                                 f"of column {label_column!r}")
            raw_labels = np.asarray([ids[v] for v in raw_labels.tolist()], dtype=np.int64)
        elif raw_labels.dtype.kind not in "iu":
            raise ValueError(f"{self.path}: label column {label_column!r} has dtype {raw_labels.dtype}, "
                             "not int")
        self._labels = raw_labels.astype(np.int64).reshape(-1)
        self.class_names = _resolve_names(class_names, None, self._labels, str(self.path))
        _check_labels(self._labels, self.num_classes,
                      lambda r: f"row {r} of column {label_column!r} in {self.path}")
        images = ds.select_columns([image_column])
        # Undecoded access keeps the stored bytes (no re-encoding for shards) and lets us word decode errors.
        self._encoded = isinstance(ds.features[image_column], datasets.Image)
        if self._encoded:
            images = images.cast_column(image_column, datasets.Image(decode=False))
        self._images = images

    def _value(self, i: int) -> Any:
        return self._images[i][self.image_column]

    def _encoded_bytes(self, i: int) -> tuple[bytes, str]:
        value = self._value(i)
        what = f"row {i} of {self.path}"
        if value.get("bytes") is not None:
            return value["bytes"], what
        if value.get("path"):
            path = Path(value["path"])
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path} ({what})")
            return path.read_bytes(), f"{path} ({what})"
        raise ValueError(f"{what}: image column {self.image_column!r} is empty")

    def _load(self, i: int) -> Image.Image:
        if self._encoded:
            return decode_image(*self._encoded_bytes(i))
        value = self._value(i)
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        return _array_to_image(np.asarray(value), f"row {i} of {self.path}")

    def raw(self, index: int) -> tuple[bytes, str] | None:
        if not self._encoded:
            return None
        data, what = self._encoded_bytes(self._index(index))
        ext = _SHARD_FORMATS.get(_image_format(data, what))
        return (data, ext) if ext else None

    def spec(self) -> dict[str, Any]:
        options = {"split": self.split, "image_column": self.image_column, "label_column": self.label_column,
                   "class_names": list(self.class_names)}
        return {"kind": self.kind, "path": str(self.path.resolve()), "options": options}
