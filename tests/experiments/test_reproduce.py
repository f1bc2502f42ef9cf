"""selmix_dist.reproduce: aggregation (mean ± std against hand-computed values), split indexing (feature rows
map to the right images and labels), and a reduced real-data reproduction (slow)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selmix_dist.data.sources import ArraySource
from selmix_dist.data.splits import long_tailed_counts
from selmix_dist.features.backbones import build_backbone
from selmix_dist.reproduce import (
    METHODS,
    CachedSplit,
    Hyper,
    LTSplitSpec,
    ReproduceConfig,
    cached_features,
    first_per_class,
    format_mean_std,
    lt_train_data,
    mean_std,
    reproduce,
    summary_rows,
)


# ------------------------------------------------------------------------------------------- aggregation
def test_mean_std_hand_computed():
    # mean 0.3; deviations −0.2, −0.1, 0.3 → squares sum 0.14; ddof = 1 → variance 0.07
    mean, std = mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(math.sqrt(0.07))
    assert mean_std([0.8]) == (pytest.approx(0.8), 0.0)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize(("values", "text"), [
    ([0.5, 0.6], "55.0 ± 7.1"),          # std = sqrt(2 · 0.05² / 1) = 0.0707
    ([0.1, 0.2, 0.6], "30.0 ± 26.5"),    # sqrt(0.07) = 0.2646
    ([0.8], "80.0 ± 0.0"),
    ([0.12345, 0.12345], "12.3 ± 0.0"),
])
def test_format_mean_std(values, text):
    assert format_mean_std(values) == text


def test_summary_rows_per_method_and_rho():
    metrics = ("mean_recall", "min_recall", "h_mean", "g_mean", "min_coverage")
    records = []
    for seed, base in enumerate([0.5, 0.6, 0.7]):
        for rho_u, shift in ((100.0, 0.0), (1.0, 0.1)):
            records.append({"rho_u": rho_u, "seed": seed, "method": "selmix_min_recall", "split": "test",
                            **{m: base + shift for m in metrics}})
            records.append({"rho_u": rho_u, "seed": seed, "method": "erm", "split": "test",
                            **{m: 0.2 for m in metrics}})
            records.append({"rho_u": rho_u, "seed": seed, "method": "erm", "split": "val",
                            **{m: 0.9 for m in metrics}})
    rows = summary_rows(records, 100.0)
    # METHODS order: ERM before SelMix; only methods present appear
    assert [r["method"] for r in rows] == [METHODS["erm"], METHODS["selmix_min_recall"]]
    assert rows[0]["seeds"] == 3 and rows[0]["min_recall"] == "20.0 ± 0.0"
    assert rows[1]["mean_recall"] == "60.0 ± 10.0"       # 0.5, 0.6, 0.7: std 0.1
    assert summary_rows(records, 1.0)[1]["g_mean"] == "70.0 ± 10.0"
    assert summary_rows(records, 100.0, split="val")[0]["h_mean"] == "90.0 ± 0.0"


# ------------------------------------------------------------------------------------------- indexing
def test_first_per_class_matches_loop():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0, 0])
    expect, seen = [], {}
    for i, y in enumerate(labels.tolist()):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= 2:
            expect.append(i)
    assert first_per_class(labels, 2).tolist() == expect
    assert first_per_class(labels, None).tolist() == list(range(10))


def test_split_rows_map_to_their_images_and_labels():
    """Features carry their source position in column 0, so every part of the split can be traced back."""
    k, per_class = 10, 40
    labels = torch.arange(k).repeat_interleave(per_class)[torch.randperm(k * per_class,
                                                                          generator=torch.Generator().manual_seed(1))]
    positions = torch.arange(len(labels))
    features = torch.stack([positions.float(), torch.rand(len(labels))], dim=1)
    train = CachedSplit(features, labels, positions)
    test = CachedSplit(features[:50], labels[:50], positions[:50])
    spec = LTSplitSpec(n1=20, m1=15, rho_l=10.0, n_val=5)
    data, rows = lt_train_data(train, test, spec, rho_u=5.0, seed=3)
    used = torch.cat([rows[p] for p in ("labeled", "unlabeled", "val")])
    assert len(used.unique()) == len(used)                      # disjoint parts
    for part, fs in (("labeled", data.labeled), ("val", data.val)):
        pos = fs.features[:, 0].long()
        assert torch.equal(pos, rows[part])                     # each feature row is its own image
        assert torch.equal(fs.labels, labels[pos])              # … with that image's label
    assert torch.equal(data.partners.features[:, 0].long(), rows["unlabeled"])
    assert bool((data.partners.labels == -1).all())             # hidden from the trainer
    assert torch.bincount(data.labeled.labels, minlength=k).tolist() == long_tailed_counts(20, 10.0, k)
    assert torch.bincount(labels[rows["unlabeled"]], minlength=k).tolist() == long_tailed_counts(15, 5.0, k)
    assert torch.bincount(data.val.labels, minlength=k).tolist() == [5] * k
    # another ρ_u keeps the labeled and validation rows (shared heads across ρ_u are comparable)
    _, rows_flat = lt_train_data(train, test, spec, rho_u=1.0, seed=3)
    assert torch.equal(rows_flat["labeled"], rows["labeled"]) and torch.equal(rows_flat["val"], rows["val"])
    with pytest.raises(ValueError, match="without a labeled image"):
        lt_train_data(train, test, LTSplitSpec(n1=5, m1=5, rho_l=10.0, n_val=5), rho_u=1.0, seed=0)


def test_cached_rows_are_the_features_of_their_images(tmp_path):
    """A subset extracted into the cache: row r holds the backbone features of source image positions[r]."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(30) % 3, class_names=["a", "b", "c"])
    backbone = build_backbone("tf_efficientnet_lite0", "none", image_size=32)
    positions = first_per_class(source.labels(), 4)
    rows, seconds = cached_features(source, positions, backbone, tmp_path, "train", batch_size=5)
    assert seconds > 0
    assert torch.equal(rows.positions, positions)
    assert torch.equal(rows.labels, source.labels()[positions])
    tf = backbone.transform(train=False, normalize=False)
    for r in (0, 5, len(positions) - 1):
        image, label = source[int(positions[r])]
        direct = backbone(backbone.normalize(tf(image)[None]))[0]
        assert int(rows.labels[r]) == label
        torch.testing.assert_close(rows.features[r], direct, atol=2e-3, rtol=2e-3)  # cache stores float16
    again, seconds_again = cached_features(source, positions, backbone, tmp_path, "train", batch_size=5)
    assert seconds_again == 0.0 and torch.equal(again.features, rows.features)


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_reduced_reproduction_selmix_raises_min_recall(cifar10_root, tmp_path):
    """One seed, a subset of CIFAR-10 (300 train / 100 test images per class) at the tool's 128 px, ρ_l = ρ_u = 10,
    the tool's learning rates with fewer steps: SelMix for min recall ends above the logit-adjusted head's test
    min recall."""
    cfg = ReproduceConfig(
        data=cifar10_root, out=tmp_path / "out", cache=tmp_path / "cache", seeds=(0,), rho_us=(10.0,),
        image_size=128, subset=(300, 100), spec=LTSplitSpec(n1=100, m1=150, rho_l=10.0, n_val=50),
        hyper=Hyper(steps=500, selftrain_steps=500), methods=("la", "selmix_min_recall"))
    result = reproduce(cfg, log=lambda _line: None)
    test = {r["method"]: r for r in result["records"] if r["split"] == "test"}
    assert len(result["records"]) == 4
    assert test["selmix_min_recall"]["min_recall"] > test["la"]["min_recall"]
    assert (cfg.out / "results.csv").read_text().count("\n") == 5  # header + 2 methods × (val, test)
    assert "SelMix: min recall" in (cfg.out / "tables.md").read_text()
