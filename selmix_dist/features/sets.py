"""What the trainer trains on: labeled, partner, validation and test feature sets.

A `FeatureSet` answers `take(index) -> features[B, d]`. In mode 'features' that is a row lookup in a
(possibly memory-mapped) cached tensor; in mode 'online' it loads the images and runs the frozen backbone,
with training augmentation for training draws. Every rank can take any index (the cache is one file set,
the image source is random-access), so partners drawn from the global P never need to move between ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from selmix_dist.core.rng import derive_seed


class FeatureSet:
    """Cached features float32[N, d] with labels int64[N] (−1 where the label is hidden)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, name: str):
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"split '{name}': features {tuple(features.shape)} and labels "
                             f"{tuple(labels.shape)} do not match")
        self.features = features
        self.labels = labels.to(torch.int64)
        self.name = name

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    def take(self, index: torch.Tensor, *, augment_seed: tuple[int, ...] | None = None) -> torch.Tensor:
        """Rows `index` as float32[B, d] (cached features carry no augmentation)."""
        return self.features[index].to(torch.float32)

    def hidden(self) -> FeatureSet:
        """The same features with every label replaced by −1 (unlabeled partners)."""
        return FeatureSet(self.features, torch.full_like(self.labels, -1), self.name)


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
        batch = torch.stack([tf(self.load(int(i))) for i in index.tolist()]).to(self.device)
        return self.backbone(batch).float()

    def hidden(self) -> OnlineFeatureSet:
        return OnlineFeatureSet(self.load, torch.full_like(self.labels, -1), self.backbone, self.train_tf,
                                self.eval_tf, self._num_features, self.device, self.name)


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
