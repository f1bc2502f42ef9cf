"""The trainer's data from a config: every split as a `FeatureSet`, from the feature cache or online.

`train_data(cfg, device)` is what `selmix_dist.train.entry.train` calls; the two modes differ only here.
"""

from __future__ import annotations

from typing import Any

import torch

from selmix_dist.config import Config
from selmix_dist.features.sets import FeatureSet, OnlineFeatureSet, TrainData


def _split_names(cfg: Config) -> dict[str, str]:
    names = {"labeled": cfg.data.labeled_split, "val": cfg.data.val_split}
    if cfg.data.test_split:
        names["test"] = cfg.data.test_split
    if cfg.selmix.setting == "semi":
        names["partners"] = cfg.data.unlabeled_split
    return names


def _class_names(split_dir: str) -> list[str] | None:
    if not split_dir:
        return None
    from selmix_dist.data.splits import load_manifest

    return list(load_manifest(split_dir)["class_names"])


def cached_train_data(cfg: Config) -> TrainData:
    """Mode 'features': every split from the feature cache `data.features`, read on demand (no copy)."""
    from selmix_dist.features.lists import check_cache_against_list
    from selmix_dist.features.reader import open_features

    if not cfg.data.features:
        raise ValueError("model.mode=features needs config key 'data.features' (a feature-cache directory)")
    sets: dict[str, Any] = {}
    for role, split in _split_names(cfg).items():
        reader = open_features(cfg.data.features, split)
        if cfg.data.split_dir:  # the lists are the user's: the cache must hold what they now say
            check_cache_against_list(reader, cfg.data.features, cfg.data.split_dir, split)
        sets[role] = FeatureSet(reader, reader.labels, split)
    return TrainData(class_names=_class_names(cfg.data.split_dir), **sets)


def online_train_data(cfg: Config, device: torch.device) -> TrainData:
    """Mode 'online': images of the split lists in `data.split_dir` through the frozen backbone."""
    from selmix_dist.data.splits import load_split, open_split_source
    from selmix_dist.features.backbones import build_backbone

    if not cfg.data.split_dir:
        raise ValueError("model.mode=online needs config key 'data.split_dir'")
    backbone = build_backbone(cfg.model.backbone, cfg.model.weights, seed=cfg.run.seed,
                              image_size=cfg.model.image_size or None).to(device)
    train_tf, eval_tf = backbone.transform(train=True), backbone.transform(train=False)
    sets: dict[str, Any] = {}
    for role, split in _split_names(cfg).items():
        source = open_split_source(cfg.data.split_dir, split)
        positions = load_split(cfg.data.split_dir, split, source=source)
        items = [int(i) for i in positions.items]
        sets[role] = OnlineFeatureSet(lambda i, src=source, it=items: src[it[i]][0],
                                      torch.as_tensor(positions.labels), backbone, train_tf, eval_tf,
                                      backbone.num_features, device, split)
    return TrainData(class_names=_class_names(cfg.data.split_dir), **sets)


def train_data(cfg: Config, device: torch.device) -> TrainData:
    """Every split the config names, in its `model.mode`."""
    return cached_train_data(cfg) if cfg.model.mode == "features" else online_train_data(cfg, device)
