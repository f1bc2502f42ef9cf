"""An experiment's data: frozen-backbone features of every train and test image (extracted once into a feature
cache, read afterwards), and per (ρ_u, seed) the long-tailed split of the cached train rows.

Cache: ``<cache>/experiments/<name>/<tag>-<image size>[-sub<train>-<test>][-c<classes>]/{train,test}``
holds one row per image of each ImageFolder in source order, float16 (``extract_features``); a split only
indexes rows, so no image is decoded twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from selmix_dist.data.archives import unpack_once
from selmix_dist.data.splits import assign_lt_split, resolve_class_order
from selmix_dist.experiments.spec import ExperimentSpec, SplitSpec
from selmix_dist.features.sets import FeatureSet, TrainData

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Subset:
    """A reduced run: the first ``train`` / ``test`` images of each class (None: all) of the first ``classes``
    classes in source order (None: all)."""

    train: int | None = None
    test: int | None = None
    classes: int | None = None

    def suffix(self) -> str:
        sub = f"-sub{self.train or 'all'}-{self.test or 'all'}" if (self.train, self.test) != (None, None) else ""
        return sub + (f"-c{self.classes}" if self.classes is not None else "")


@dataclass
class CachedSplit:
    """Rows of a feature cache: features float32[N, d], labels int64[N] in [0, K), positions int64[N] in the
    ImageFolder."""

    features: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


@dataclass
class ExperimentFeatures:
    """Train and test rows, the K class names, the class order (labels from head to tail; None: 0 … K−1),
    the cache directory and the seconds spent extracting (0 when the cache was complete)."""

    train: CachedSplit
    test: CachedSplit
    class_names: list[str]
    class_order: list[int] | None
    cache_dir: Path
    extract_seconds: float

    def test_split(self) -> FeatureSet:
        return FeatureSet(self.test.features, self.test.labels, "test")


def feature_cache_dir(spec: ExperimentSpec, cache: Path, subset: Subset | None = None) -> Path:
    f = spec.features
    return Path(cache) / "experiments" / spec.name / f"{f.tag}-{f.image_size}{(subset or Subset()).suffix()}"


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Positions int64[M] of the first ``per_class`` items of every class in source order (all when None).
    Deterministic, so a subset's feature cache is reusable."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if per_class is None:
        return torch.arange(len(labels))
    if per_class < 1:
        raise ValueError(f"subset size per class must be >= 1, got {per_class}")
    rank_in_class = torch.zeros_like(labels)
    for k in labels.unique().tolist():
        members = (labels == k).nonzero().flatten()
        rank_in_class[members] = torch.arange(len(members))
    return (rank_in_class < per_class).nonzero().flatten()


def dataset_root(spec: ExperimentSpec, data_dir: Path, cache: Path) -> Path:
    """The unpacked archive (unpacked into ``cache`` on first use)."""
    return unpack_once(Path(data_dir) / spec.data.archive, cache)


def load_experiment_features(spec: ExperimentSpec, cache: Path, data_dir: Path, subset: Subset | None = None,
                             log: Callable[[str], None] = print) -> ExperimentFeatures:
    """Train and test features (extracting only what the cache lacks) with labels 0 … K−1 in source order."""
    from selmix_dist.data.sources import open_source
    from selmix_dist.features.backbones import build_backbone
    from selmix_dist.features.cache import extract_features
    from selmix_dist.features.reader import load_features

    subset = subset or Subset()
    root = dataset_root(spec, data_dir, cache)
    cache_dir = feature_cache_dir(spec, cache, subset)
    backbone = None
    out, names, seconds = {}, None, 0.0
    for split in SPLITS:
        folder = root / getattr(spec.data, split)
        source = open_source("imagefolder", folder)
        if names is not None and list(source.class_names) != names:
            raise ValueError(f"{folder} has classes {source.class_names[:5]}…, the train folder "
                             f"{names[:5]}…: data.train and data.test must hold the same classes")
        names = list(source.class_names)
        kept = names[:subset.classes] if subset.classes is not None else names
        if subset.classes is not None and not 2 <= subset.classes <= len(names):
            raise ValueError(f"subset of {subset.classes} classes: {folder} has {len(names)}")
        labels = source.labels()
        in_kept = labels < len(kept)           # the first classes in source order keep their labels
        per_class = subset.train if split == "train" else subset.test
        positions = in_kept.nonzero().flatten()[first_per_class(labels[in_kept], per_class)]
        if backbone is None:
            f = spec.features
            backbone = build_backbone(f.backbone, f.weights, image_size=f.image_size)
        t0 = time.perf_counter()
        stats = extract_features(source, positions, labels[positions], backbone, cache_dir, split,
                                 batch_size=spec.features.batch_size, dtype="float16", num_workers=0,
                                 progress=False)
        loaded = load_features(cache_dir, split)
        sec = 0.0 if stats.noop else time.perf_counter() - t0
        seconds += sec
        log(f"features {split}: {len(loaded.labels)} images, d={loaded.features.shape[1]}, "
            + (f"extracted in {sec:.0f} s" if sec else "cached") + f" [{cache_dir}]")
        out[split] = CachedSplit(loaded.features, loaded.labels, loaded.indices)
    order = None
    if spec.data.class_order:
        full = resolve_class_order(spec.data.class_order, names)
        order = [label for label in full if label < len(kept)]
    return ExperimentFeatures(out["train"], out["test"], kept, order, cache_dir, seconds)


def lt_train_data(features: ExperimentFeatures, split: SplitSpec, rho_u: float,
                  seed: int) -> tuple[TrainData, dict[str, torch.Tensor]]:
    """The long-tailed split of the cached train rows for (ρ_u, seed) as TrainData (unlabeled labels hidden;
    no test split) and the row indices int64[·] of each part into ``features.train``."""
    train, names = features.train, features.class_names
    parts = assign_lt_split(train.labels.numpy(), num_classes=len(names), n1=split.n1, rho_l=split.rho_l,
                            m1=split.m1, rho_u=rho_u, n_val=split.n_val, seed=seed,
                            class_order=features.class_order, class_names=names)
    rows = {name: torch.from_numpy(parts[name]) for name in ("labeled", "unlabeled", "val")}
    counts = torch.bincount(train.labels[rows["labeled"]], minlength=len(names))
    if bool((counts == 0).any()):
        empty = [names[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise ValueError(f"split.n1={split.n1}, split.rho_l={split.rho_l:g} leave class(es) {empty[:5]} without a "
                         "labeled image (⌊n1/rho_l⌋ = 0); raise n1 or lower rho_l")

    def part(name: str) -> FeatureSet:
        r = rows[name]
        return FeatureSet(train.features[r], train.labels[r], name)

    data = TrainData(labeled=part("labeled"), val=part("val"), partners=part("unlabeled").hidden(),
                     class_names=list(names))
    return data, rows
