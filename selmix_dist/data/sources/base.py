"""The source interface every kind implements, and what the kinds share: decoding, label checks, list files."""

from __future__ import annotations

import abc
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL format name -> the extension a webdataset member gets; other formats are re-encoded.
_SHARD_FORMATS = {"JPEG": "jpg", "PNG": "png"}


def decode_image(data: bytes | str | Path, what: str) -> Image.Image:
    """Decode encoded bytes or an image file into an RGB PIL image; errors name ``what``."""
    if isinstance(data, (str, Path)) and not os.path.isfile(data):
        raise FileNotFoundError(f"image file not found: {what}")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot decode image {what}: {exc}") from exc


def _image_format(data: bytes, what: str) -> str:
    """PIL's format name of encoded bytes (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format or ""
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot decode image {what}: {exc}") from exc


def _resolve_names(class_names: Sequence[str] | None, num_classes: int | None, labels: np.ndarray,
                   what: str) -> list[str]:
    """K class names: given names, else ``class_<k>`` for ``num_classes`` or max label + 1."""
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: duplicate class names")
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"{what}: num_classes={num_classes} but {len(names)} class names")
        return names
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    return [f"class_{k}" for k in range(num_classes)]


def _check_labels(labels: np.ndarray, num_classes: int, where: Callable[[int], str],
                  allow_unlabeled: bool = False) -> None:
    """ValueError naming the first label outside [0, K) (−1 allowed for unlabeled lists)."""
    low = -1 if allow_unlabeled else 0
    bad = np.flatnonzero((labels < low) | (labels >= num_classes))
    if bad.size:
        pos = int(bad[0])
        raise ValueError(f"label {int(labels[pos])} outside [{low}, {num_classes}) at {where(pos)}")


def read_list_file(path: str | Path,
                   class_names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Parse ``item label`` lines (blank lines and ``#`` comments skipped) -> (items, int64[N] labels).

    The item may contain spaces (the label is the last token). A label token that is not an integer is
    looked up in ``class_names``; errors name ``path:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    name_to_id = {n: k for k, n in enumerate(class_names or [])}
    items: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'item label', got {line!r}")
            item, token = parts
            try:
                label = int(token)
            except ValueError:
                if token not in name_to_id:
                    raise ValueError(f"{path}:{lineno}: unknown class name {token!r}") from None
                label = name_to_id[token]
            items.append(item)
            labels.append(label)
    return items, np.asarray(labels, dtype=np.int64).reshape(-1)


class ImageSource(abc.ABC):
    """Indexable image dataset: ``source[i] -> (PIL RGB image, int label)``.

    Subclasses set ``class_names`` (K names) and ``_labels`` (numpy int64[N]) and implement ``_load``.
    File-backed ones also set ``root`` and ``paths`` (relative posix paths, one per item).
    """

    kind = ""
    class_names: list[str]
    _labels: np.ndarray
    root: Path | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self) -> torch.Tensor:
        """int64[N] labels, without decoding images."""
        return torch.from_numpy(self._labels.copy())

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {self.kind} source of length {len(self)}")
        return i

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        i = self._index(index)
        return self._load(i), int(self._labels[i])

    @abc.abstractmethod
    def _load(self, i: int) -> Image.Image:
        """Decode item ``i`` (already bounds-checked) into an RGB image."""

    def raw(self, index: int) -> tuple[bytes, str] | None:
        """The stored encoded image as (bytes, "jpg"|"png"), or None if it has to be encoded anew."""
        return None

    def spec(self) -> dict[str, Any] | None:
        """JSON-serialisable ``{"kind", "path", "options"}`` that reopens this source via
        ``open_source(kind, path, **options)``; None for purely in-memory sources."""
        return None

    def _raw_file(self, path: Path) -> tuple[bytes, str] | None:
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        data = path.read_bytes()
        ext = _SHARD_FORMATS.get(_image_format(data, str(path)))
        return (data, ext) if ext else None


def _array_to_image(arr: np.ndarray, what: str) -> Image.Image:
    """uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] -> RGB PIL image."""
    if arr.dtype != np.uint8:
        raise ValueError(f"{what}: image dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(arr).convert("RGB")
    raise ValueError(f"{what}: image shape {arr.shape}, expected [H,W], [H,W,1], [H,W,3] or [H,W,4]")
