"""Webdataset shards: uncompressed tars of `<key>.jpg|png` + `<key>.cls`, indexed by one scan per shard."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selmix_dist.data.sources.base import (
    _SHARD_FORMATS,
    IMAGE_EXTENSIONS,
    ImageSource,
    _check_labels,
    _image_format,
    _resolve_names,
    decode_image,
)

WDS_META = "dataset.json"


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
