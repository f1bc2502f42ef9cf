"""What the trainer trains on: labeled, partner, validation and test feature sets.

A `FeatureSet` answers `take(index) -> features float32[B, d]`. In mode 'features' that is a row lookup in
the feature cache (`selmix_dist.features.reader.open_features`: rows read from the page cache, one copy
shared by the ranks of a node) or in a tensor held in memory; in mode 'online' it loads the images and runs
the frozen backbone, with training augmentation for training draws. Every rank can take any index (the
cache is one file set, the image source is random-access), so partners drawn from the global P never need
to move between ranks. `subset(rows)` and `hidden()` are views: they share the rows, never copy them.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from selmix_dist.core.rng import derive_seed


class FeatureRows(Protocol):
    """Row storage of a FeatureSet: `CachedFeatures` (the feature cache's reader) or `TensorRows` (in memory)."""

    num_features: int

    def __len__(self) -> int: ...

    def take(self, index: torch.Tensor) -> torch.Tensor: ...


class TensorRows:
    """Features held in memory: a float tensor [N, d] of any float dtype, converted to float32 per batch."""

    def __init__(self, features: torch.Tensor):
        self.features = features
        self.num_features = features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.features[index].to(torch.float32)


class FeatureSet:
    """Features [N, d] with labels int64[N] (−1 where the label is hidden).

    features: a float tensor [N, d] held in memory, or a `CachedFeatures` reader of the feature cache.
    """

    def __init__(self, features: torch.Tensor | FeatureRows, labels: torch.Tensor, name: str):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else (len(features), features.num_features)
        if len(shape) != 2 or labels.ndim != 1 or shape[0] != labels.shape[0]:
            raise ValueError(f"split '{name}': features {shape} and labels {tuple(labels.shape)} do not match")
        self._rows = TensorRows(features) if isinstance(features, torch.Tensor) else features
        self._positions: torch.Tensor | None = None  # rows of `_rows` this set sees (None: all, in order)
        self.labels = labels.to(torch.int64)
        self.name = name

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_features(self) -> int:
        return self._rows.num_features

    @property
    def features(self) -> torch.Tensor:
        """All rows as one tensor [N, d]: the tensor given, if it was one (no subset); else a float32 copy
        (O(N·d) private memory: for tests and small sets; training reads batches with `take`)."""
        if self._positions is None and isinstance(self._rows, TensorRows):
            return self._rows.features
        return self.take(torch.arange(len(self)))

    def _stored(self, index: torch.Tensor) -> torch.Tensor:
        """Positions in the row storage of this set's rows `index`."""
        return index if self._positions is None else self._positions[index]

    def take(self, index: torch.Tensor, *, augment_seed: tuple[int, ...] | None = None) -> torch.Tensor:
        """Rows `index` (int64[B]) as float32[B, d] (cached features carry no augmentation)."""
        return self._rows.take(self._stored(index))

    def subset(self, rows: torch.Tensor, name: str | None = None) -> FeatureSet:
        """The rows `rows` (int64[M] positions in this set, or a bool mask [N]) as a set of their own,
        sharing this set's storage (nothing is copied but the labels)."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            if rows.shape != self.labels.shape:
                raise ValueError(f"split '{self.name}': mask of shape {tuple(rows.shape)} for {len(self)} rows")
            rows = rows.nonzero().flatten()
        if rows.ndim != 1 or rows.is_floating_point():
            raise ValueError(f"split '{self.name}': subset rows must be a 1-D integer index or a bool mask")
        rows = rows.to(torch.int64)
        outside = (rows < 0) | (rows >= len(self))
        if bool(outside.any()):
            raise IndexError(f"split '{self.name}': subset row {int(rows[outside][0])} is outside [0, {len(self)})")
        view = copy.copy(self)
        view._positions = self._stored(rows)
        view.labels = self.labels[rows]
        view.name = name or self.name
        return view

    def hidden(self) -> FeatureSet:
        """The same rows with every label replaced by −1 (unlabeled partners)."""
        view = copy.copy(self)
        view.labels = torch.full_like(self.labels, -1)
        return view


class OnlineFeatureSet(FeatureSet):
    """Images through a frozen backbone at every access (mode 'online').

    `load(i) -> PIL image`; `train_tf` / `eval_tf` map a PIL image to a tensor[3, H, W]. Training draws
    seed the global RNGs from (seed, rank, step) first, so augmentations are reproducible on resume.
    """

    def __init__(self, load: Callable[[int], object], labels: torch.Tensor, backbone: torch.nn.Module,
                 train_tf: Callable, eval_tf: Callable, num_features: int, device: torch.device, name: str):
        self.load, self.backbone = load, backbone
        self.train_tf, self.eval_tf = train_tf, eval_tf
        self.labels = labels.to(torch.int64)
        self._num_features, self.device, self.name = num_features, device, name
        self._rows, self._positions = None, None  # images, not stored rows; `subset` sets positions

    @property
    def num_features(self) -> int:
        return self._num_features

    @torch.no_grad()
    def take(self, index: torch.Tensor, *, augment_seed: tuple[int, ...] | None = None) -> torch.Tensor:
        if augment_seed is not None:
            # timm's random-resized-crop draws from Python's `random`, torchvision's from torch's RNG.
            seed = derive_seed(*augment_seed)
            random.seed(seed)
            torch.manual_seed(seed)
        tf = self.train_tf if augment_seed is not None else self.eval_tf
        batch = torch.stack([tf(self.load(int(i))) for i in self._stored(index).tolist()]).to(self.device)
        return self.backbone(batch).float()


@dataclass
class TrainData:
    """Everything the trainer reads. `partners` is None in the supervised setting (partners = labeled)."""

    labeled: FeatureSet
    val: FeatureSet
    partners: FeatureSet | None = None
    test: FeatureSet | None = None
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return int(max(self.labeled.labels.max(), self.val.labels.max())) + 1

    def train_class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labeled.labels, minlength=self.num_classes)

    def validate(self, expected_classes: int = 0) -> None:
        """Boundary checks: label ranges, K agreement, feature widths, a validation sample for every class."""
        k = self.num_classes
        if expected_classes and expected_classes != k:
            raise ValueError(f"config data.num_classes={expected_classes} but the data has {k} classes")
        for fs in (self.labeled, self.val, self.test):
            if fs is None:
                continue
            bad = (fs.labels < 0) | (fs.labels >= k)
            if bool(bad.any()):
                pos = int(bad.nonzero()[0])
                raise ValueError(f"split '{fs.name}': sample {pos} has label {int(fs.labels[pos])} "
                                 f"outside [0, {k})")
        widths = {fs.name: fs.num_features for fs in (self.labeled, self.val, self.partners, self.test) if fs}
        if len(set(widths.values())) != 1:
            raise ValueError(f"feature widths differ between splits: {widths}")
        val_counts = torch.bincount(self.val.labels, minlength=k)
        empty = (val_counts == 0).nonzero().flatten().tolist()
        if empty:
            names = [self.class_names[i] if self.class_names else str(i) for i in empty[:5]]
            raise ValueError(f"split '{self.val.name}' has no sample of class(es) {names}"
                             f"{' and more' if len(empty) > 5 else ''}: prototypes and recalls need at least one")
