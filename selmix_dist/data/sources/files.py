"""Sources over image files on disk: an ImageFolder tree, or a list file of `relative/path label` lines."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selmix_dist.data.sources.base import (
    IMAGE_EXTENSIONS,
    ImageSource,
    _check_labels,
    _resolve_names,
    decode_image,
    read_list_file,
)


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
