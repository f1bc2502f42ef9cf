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

import abc
import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "ArraySource",
    "HFDiskSource",
    "ImageFolderSource",
    "ImageSource",
    "SplitListSource",
    "WebDatasetSource",
    "decode_image",
    "open_source",
    "read_list_file",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL format name -> the extension a webdataset member gets; other formats are re-encoded.
_SHARD_FORMATS = {"JPEG": "jpg", "PNG": "png"}
WDS_META = "dataset.json"


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


class ImageFolderSource(ImageSource):
    """``root/<class>/**/<file>.jpg|jpeg|png``; classes are the sorted sub-directory names (label = rank).

    Files are listed recursively and sorted; hidden entries are skipped. A class directory without images
    is kept as a class with no samples.
    """

    kind = "imagefolder"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and e.name[0] != ".")
        if not self.class_names:
            raise ValueError(f"image folder {self.root} has no class sub-directories")
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root / name):
                dirnames[:] = [d for d in dirnames if d[0] != "."]
                rel = Path(dirpath).relative_to(self.root)
                found += [(rel / f).as_posix() for f in filenames
                          if f[0] != "." and f.lower().endswith(IMAGE_EXTENSIONS)]
            paths += sorted(found)
            labels += [label] * len(found)
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)

    def _load(self, i: int) -> Image.Image:
        return decode_image(self.root / self.paths[i], str(self.root / self.paths[i]))

    def raw(self, index: int) -> tuple[bytes, str] | None:
        return self._raw_file(self.root / self.paths[self._index(index)])

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root.resolve()), "options": {}}


class SplitListSource(ImageSource):
    """A list file of ``relative/path label`` lines, paths relative to ``root`` (default: the list's folder).

    Class names come from ``class_names`` or ``class_names_file`` (one name per line; K = their number),
    else ``class_<k>`` for K = ``num_classes`` or max label + 1. Labels may be written as integers or, when
    names are known, as class names. ``allow_unlabeled`` accepts −1 labels (an unlabeled split list).
    """

    kind = "splitlist"

    def __init__(self, list_file: str | Path, root: str | Path | None = None, *,
                 class_names: Sequence[str] | None = None, class_names_file: str | Path | None = None,
                 num_classes: int | None = None, allow_unlabeled: bool = False):
        self.list_file = Path(list_file)
        self.root = Path(root) if root is not None else self.list_file.parent
        if not self.root.is_dir():
            raise FileNotFoundError(f"split-list root not found: {self.root}")
        if class_names is not None and class_names_file is not None:
            raise ValueError("give class_names or class_names_file, not both")
        self.class_names_file = class_names_file
        if class_names_file is not None:
            names_path = Path(class_names_file)
            if not names_path.is_file():
                raise FileNotFoundError(f"class-names file not found: {names_path}")
            lines = names_path.read_text(encoding="utf-8").splitlines()
            class_names = [ln.strip() for ln in lines if ln.strip()]
        self.paths, self._labels = read_list_file(self.list_file, class_names)
        self.class_names = _resolve_names(class_names, num_classes, self._labels, str(self.list_file))
        self.allow_unlabeled = allow_unlabeled
        _check_labels(self._labels, self.num_classes, self._line_of, allow_unlabeled)

    def _line_of(self, position: int) -> str:
        """``file:line`` of the ``position``-th entry (re-reads the file; only used to word an error)."""
        with self.list_file.open(encoding="utf-8") as f:
            lines = [n for n, ln in enumerate(f, start=1) if ln.strip() and not ln.strip().startswith("#")]
        return f"{self.list_file}:{lines[position]}"

    def _load(self, i: int) -> Image.Image:
        path = self.root / self.paths[i]
        return decode_image(path, f"{path} (listed in {self.list_file})")

    def raw(self, index: int) -> tuple[bytes, str] | None:
        return self._raw_file(self.root / self.paths[self._index(index)])

    def spec(self) -> dict[str, Any]:
        options: dict[str, Any] = {"root": str(self.root.resolve()), "allow_unlabeled": self.allow_unlabeled}
        if self.class_names_file is not None:
            options["class_names_file"] = str(Path(self.class_names_file).resolve())
        else:
            options["class_names"] = list(self.class_names)
        return {"kind": self.kind, "path": str(self.list_file.resolve()), "options": options}


def _expand_shards(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files from a directory (its ``*.tar``), a file, a glob, a ``{000..009}`` pattern or a list."""
    if isinstance(path, (list, tuple)):
        return [p for item in path for p in _expand_shards(item)]
    text = str(path)
    if os.path.isdir(text):
        found = sorted(Path(text).glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in directory {text}")
        return found
    if "{" in text:
        import braceexpand  # a webdataset dependency

        return [p for item in braceexpand.braceexpand(text) for p in _expand_shards(item)]
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text))
        if not found:
            raise FileNotFoundError(f"no shards match {text}")
        return found
    if not os.path.isfile(text):
        raise FileNotFoundError(f"webdataset shard not found: {text}")
    return [Path(text)]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's (key, extension): the extension starts at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDatasetSource(ImageSource):
    """Webdataset tar shards made indexable: the tars are scanned once with ``tarfile`` (member offsets
    and the ``.cls`` labels are kept) and images are read on demand by seeking into the shard.

    A sample is a run of consecutive members sharing a key, with exactly one image (``.jpg``, ``.jpeg`` or
    ``.png``) and one ``.cls``. Shards must be uncompressed tars. Class names: ``class_names``, else the
    ``dataset.json`` written by ``write_shards`` next to the shards, else ``class_<k>``; −1 labels are
    accepted when ``allow_unlabeled`` (default: what ``dataset.json`` says, else False).
    """

    kind = "webdataset"

    def __init__(self, path: str | Path | Sequence[str | Path], *, class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, allow_unlabeled: bool | None = None):
        self.path = path
        self.shards = _expand_shards(path)
        meta = _shard_meta(path)
        if class_names is None and meta is not None:
            class_names = meta["class_names"]
        if allow_unlabeled is None:
            allow_unlabeled = bool(meta is not None and meta.get("unlabeled", False))
        self.allow_unlabeled = allow_unlabeled
        self.keys: list[str] = []
        members: list[tuple[int, int, int, str]] = []  # (shard id, data offset, size, member name)
        labels: list[int] = []
        for shard_id, shard in enumerate(self.shards):
            for key, image, label in self._scan(shard):
                self.keys.append(key)
                members.append((shard_id, image.offset_data, image.size, image.name))
                labels.append(label)
        self._members = members
        self._labels = np.asarray(labels, dtype=np.int64)
        if meta is not None and meta.get("num_samples", len(self)) != len(self):
            raise ValueError(f"{WDS_META} of {path} lists {meta['num_samples']} samples, "
                             f"the shards hold {len(self)}")
        self.class_names = _resolve_names(class_names, num_classes, self._labels, str(path))
        _check_labels(self._labels, self.num_classes, self._describe_label, allow_unlabeled)

    def _describe_label(self, i: int) -> str:
        shard_id, _, _, name = self._members[i]
        return f"sample {self.keys[i]!r} ({name}) in shard {self.shards[shard_id]}"

    @staticmethod
    def _scan(shard: Path):
        """Yield (key, image TarInfo, label) per sample of one shard."""
        size = shard.stat().st_size
        try:
            with tarfile.open(shard, mode="r:") as tar:
                group: list[tarfile.TarInfo] = []
                seen: set[str] = set()
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise ValueError(f"corrupt webdataset shard {shard}: {member.name} is truncated")
                    if group and _split_member(group[0].name)[0] != _split_member(member.name)[0]:
                        yield WebDatasetSource._sample(shard, tar, group, seen)
                        group = []
                    group.append(member)
                if group:
                    yield WebDatasetSource._sample(shard, tar, group, seen)
        except (tarfile.TarError, EOFError) as exc:
            raise ValueError(f"corrupt webdataset shard {shard} (need an uncompressed tar): {exc}") from exc

    @staticmethod
    def _sample(shard: Path, tar: tarfile.TarFile, group: list[tarfile.TarInfo], seen: set[str]):
        key = _split_member(group[0].name)[0]
        if key in seen:
            raise ValueError(f"webdataset shard {shard}: key {key!r} appears twice (members must be grouped)")
        seen.add(key)
        by_ext = {_split_member(m.name)[1]: m for m in group}
        images = [m for ext, m in by_ext.items() if f".{ext}" in IMAGE_EXTENSIONS]
        if len(images) != 1 or "cls" not in by_ext:
            raise ValueError(f"webdataset shard {shard}: sample {key!r} needs one image (.jpg/.png) and "
                             f"a .cls, has {sorted(by_ext)}")
        fobj = tar.extractfile(by_ext["cls"])
        text = fobj.read().decode("utf-8", "replace").strip() if fobj else ""
        try:
            label = int(text)
        except ValueError:
            raise ValueError(f"webdataset shard {shard}: {by_ext['cls'].name} holds {text!r}, "
                             "not an integer label") from None
        return key, images[0], label

    def _read(self, i: int) -> tuple[bytes, str]:
        shard_id, offset, size, name = self._members[i]
        shard = self.shards[shard_id]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"corrupt webdataset shard {shard}: member {name} is truncated")
        return data, f"member {name} of shard {shard}"

    def _load(self, i: int) -> Image.Image:
        return decode_image(*self._read(i))

    def raw(self, index: int) -> tuple[bytes, str] | None:
        data, what = self._read(self._index(index))
        ext = _SHARD_FORMATS.get(_image_format(data, what))
        return (data, ext) if ext else None

    def spec(self) -> dict[str, Any]:
        path = [str(Path(p).resolve()) for p in self.shards]
        return {"kind": self.kind, "path": path,
                "options": {"class_names": list(self.class_names), "allow_unlabeled": self.allow_unlabeled}}


def _shard_meta(path: Any) -> dict[str, Any] | None:
    """The ``dataset.json`` beside the shards when ``path`` is a shard directory."""
    if isinstance(path, (str, Path)) and os.path.isdir(path) and (Path(path) / WDS_META).is_file():
        meta_path = Path(path) / WDS_META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"corrupt {meta_path}: {exc}") from exc
        if not isinstance(meta.get("class_names"), list):
            raise ValueError(f"{meta_path} has no 'class_names' list")
        return meta
    return None


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
