"""Archives unpacked once; experiment features (rows = backbone features of their images, subsets, cache
reuse); long-tailed splits of cached rows (each row traced back to its image); Tiny-ImageNet-LT's counts."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selmix_dist.data.archives import MARKER, unpack_once
from selmix_dist.data.splits import assign_lt_split, long_tailed_counts
from selmix_dist.experiments.data import (
    CachedSplit,
    ExperimentFeatures,
    Subset,
    feature_cache_dir,
    first_per_class,
    load_experiment_features,
    lt_train_data,
)
from selmix_dist.experiments.spec import load_spec, parse_spec
from selmix_dist.features.backbones import build_backbone

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ archives
def test_unpack_once_unpacks_into_the_archive_name_and_only_once(tmp_path, monkeypatch):
    (tmp_path / "src" / "top").mkdir(parents=True)
    (tmp_path / "src" / "top" / "a.txt").write_text("hello")
    archive = tmp_path / "thing.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "top", arcname="top")
    cache = tmp_path / "cache"
    root = unpack_once(archive, cache)
    assert root == cache / "thing"
    assert (root / "top" / "a.txt").read_text() == "hello"
    assert (root / MARKER).read_text() == f"thing.tar.gz {archive.stat().st_size}\n"
    assert [p.name for p in cache.iterdir()] == ["thing"]          # no temporary left behind

    def no_extraction(*_a, **_k):
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(tarfile, "open", no_extraction)
    assert unpack_once(archive, cache) == root                     # the marker says complete
    (cache / "other").mkdir()                                      # e.g. a copy made by hand: left alone
    (tmp_path / "other.tar.gz").touch()
    with pytest.raises(FileExistsError, match="without its .unpacked marker"):
        unpack_once(tmp_path / "other.tar.gz", cache)
    with pytest.raises(ValueError, match="not a <name>.tar.gz"):
        unpack_once(tmp_path / "thing.zip", cache)
    with pytest.raises(FileNotFoundError, match="archive not found"):
        unpack_once(tmp_path / "missing.tar.gz", cache)


# ------------------------------------------------------------------------------------------------ features
def test_cached_rows_are_the_features_of_their_images(toy_data_dir, toy_raw, tmp_path):
    """Two classes, the first 3 train / 2 test images of each: row r holds the backbone features of image
    positions[r] with its label; a second load reads the cache."""
    spec = parse_spec(toy_raw, "toy.yaml")
    subset = Subset(train=3, test=2, classes=2)
    features = load_experiment_features(spec, tmp_path, toy_data_dir, subset, log=lambda _line: None)
    assert features.cache_dir == tmp_path / "experiments" / "toy" / "lite0-32-sub3-2-c2"
    assert features.cache_dir == feature_cache_dir(spec, tmp_path, subset)
    assert features.class_names == ["ant", "bee"] and features.extract_seconds > 0
    per_class = 30                                                  # TOY_TRAIN, classes in sorted order
    assert features.train.positions.tolist() == [0, 1, 2, per_class, per_class + 1, per_class + 2]
    assert features.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert features.test.labels.tolist() == [0, 0, 1, 1]
    backbone = build_backbone("tf_efficientnet_lite0", "none", image_size=32)
    tf = backbone.transform(train=False, normalize=False)
    root = tmp_path / "toy" / "toy" / "train"
    for r, (folder, name) in enumerate([("ant", "000"), ("bee", "002")]):
        row = 0 if r == 0 else 5
        image = Image.open(root / folder / f"{name}.jpg").convert("RGB")
        direct = backbone(backbone.normalize(tf(image)[None]))[0]
        torch.testing.assert_close(features.train.features[row], direct, atol=2e-3, rtol=2e-3)  # float16 cache
    again = load_experiment_features(spec, tmp_path, toy_data_dir, subset, log=lambda _line: None)
    assert again.extract_seconds == 0.0 and torch.equal(again.train.features, features.train.features)


def test_first_per_class_matches_loop():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0, 0])
    expect, seen = [], {}
    for i, y in enumerate(labels.tolist()):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= 2:
            expect.append(i)
    assert first_per_class(labels, 2).tolist() == expect
    assert first_per_class(labels, None).tolist() == list(range(10))


# ------------------------------------------------------------------------------------------------ splits
def synthetic_features(k=10, per_class=40, seed=1, order=None) -> tuple[ExperimentFeatures, torch.Tensor]:
    """Features whose column 0 is the row's own index, so that every part of a split can be traced back."""
    labels = torch.arange(k).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    features = torch.stack([torch.arange(len(labels)).float(), torch.rand(len(labels))], dim=1)
    train = CachedSplit(features, labels, torch.arange(len(labels)))
    test = CachedSplit(features[:50], labels[:50], torch.arange(50))
    names = [f"c{i}" for i in range(k)]
    return ExperimentFeatures(train, test, names, order, Path("."), 0.0), labels


def split_spec(n1, rho_l, m1, n_val):
    raw = {"name": "s", "data": {"archive": "s.tar.gz", "train": "t", "test": "u"},
           "split": {"n1": n1, "rho_l": rho_l, "m1": m1, "n_val": n_val}, "seeds": [0], "rho_u": [1],
           "methods": {"crt": {"kind": "crt"}}}
    return parse_spec(raw, "s.yaml").split


def test_split_rows_map_to_their_images_and_labels():
    features, labels = synthetic_features()
    spec = split_spec(20, 10.0, 15, 5)
    data, rows = lt_train_data(features, spec, rho_u=5.0, seed=3)
    used = torch.cat([rows[p] for p in ("labeled", "unlabeled", "val")])
    assert len(used.unique()) == len(used)                      # disjoint parts
    for part, fs in (("labeled", data.labeled), ("val", data.val)):
        pos = fs.features[:, 0].long()
        assert torch.equal(pos, rows[part])                     # each feature row is its own image
        assert torch.equal(fs.labels, labels[pos])              # … with that image's label
    assert torch.equal(data.partners.features[:, 0].long(), rows["unlabeled"])
    assert bool((data.partners.labels == -1).all())             # hidden from every method
    assert data.test is None                                    # methods never see the test split
    assert torch.bincount(data.labeled.labels, minlength=10).tolist() == long_tailed_counts(20, 10.0, 10)
    assert torch.bincount(labels[rows["unlabeled"]], minlength=10).tolist() == long_tailed_counts(15, 5.0, 10)
    assert torch.bincount(data.val.labels, minlength=10).tolist() == [5] * 10
    # another ρ_u keeps the labeled and validation rows (labeled-only heads are shared across ρ_u)
    _, rows_flat = lt_train_data(features, spec, rho_u=1.0, seed=3)
    assert torch.equal(rows_flat["labeled"], rows["labeled"]) and torch.equal(rows_flat["val"], rows["val"])
    with pytest.raises(ValueError, match="without a labeled image"):
        lt_train_data(features, split_spec(5, 10.0, 5, 5), rho_u=1.0, seed=0)


def test_class_order_decides_which_class_is_the_head():
    order = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]
    features, _ = synthetic_features(order=order)
    data, _ = lt_train_data(features, split_spec(20, 10.0, 15, 5), rho_u=1.0, seed=0)
    counts = torch.bincount(data.labeled.labels, minlength=10).tolist()
    expect = long_tailed_counts(20, 10.0, 10)
    assert [counts[label] for label in order] == expect          # rank r's quota goes to class order[r]


def test_tiny_imagenet_protocol_counts():
    """The experiment file's split on Tiny-ImageNet's 200 × 500 training labels: validation 50 per class
    (10 000), labeled 300 … 3 (12 893), unlabeled 6 398 (ρ_u = 100) or 30 000 (ρ_u = 1), within each class's
    500 images and disjoint."""
    split = load_spec(REPO / "configs" / "experiments" / "tiny_imagenet_lt.yaml").split
    labels = np.repeat(np.arange(200), 500)
    for rho_u, unlabeled in ((100.0, 6398), (1.0, 30000)):
        parts = assign_lt_split(labels, num_classes=200, n1=split.n1, rho_l=split.rho_l, m1=split.m1,
                                rho_u=rho_u, n_val=split.n_val, seed=0)
        assert (len(parts["val"]), len(parts["labeled"]), len(parts["unlabeled"])) == (10000, 12893, unlabeled)
        labeled = np.bincount(labels[parts["labeled"]], minlength=200)
        assert (labeled[0], labeled[-1]) == (300, 3) and bool((np.diff(labeled) <= 0).all())
        assert np.bincount(labels[parts["val"]], minlength=200).tolist() == [50] * 200
        assert np.bincount(labels[parts["unlabeled"]], minlength=200)[0] == 150
        everything = np.concatenate([parts["val"], parts["labeled"], parts["unlabeled"]])
        assert len(np.unique(everything)) == len(everything)
