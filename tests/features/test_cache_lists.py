"""The feature cache answers to the split lists: training with `data.split_dir` refuses a cache that no longer
holds what the lists say (an edited label, a removed class, an emptied list, a missing list file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.feature_cache import FunctionBackbone, PositionSource

from selmix_dist.config import load_config
from selmix_dist.data.sources import ArraySource
from selmix_dist.data.splits import SPLIT_NAMES, load_split, make_lt_split
from selmix_dist.features.cache import extract_features
from selmix_dist.features.load import train_data

K = 10


def _rows(positions: torch.Tensor) -> torch.Tensor:
    return torch.stack([positions.float(), -positions.float()], dim=1)


@pytest.fixture()
def split_and_cache(tmp_path) -> tuple[Path, Path]:
    """A long-tailed split of an in-memory source of 10 classes (index lists) and its feature cache, extracted
    as tools/extract_features.py does (the list file's sha256 recorded), with a stand-in backbone."""
    labels = np.repeat(np.arange(K), 12)
    source = ArraySource(np.zeros((len(labels), 2, 2, 3), dtype=np.uint8), labels)
    split_dir, cache = tmp_path / "split", tmp_path / "cache"
    make_lt_split(source, split_dir, n1=4, rho_l=4, m1=3, rho_u=1, n_val=2, n_test=2, seed=0)
    for name in SPLIT_NAMES:
        split = load_split(split_dir, name)
        extract_features(PositionSource(torch.as_tensor(labels)), split.items, split.labels,
                         FunctionBackbone(_rows, 2, "table"), cache, name, num_workers=0, device="cpu",
                         split_sha256=split.sha256, chunk_size=16, progress=False)
    return split_dir, cache


def _data(split_dir: Path, cache: Path, *extra: str):
    cfg = load_config(None, [f"data.features={cache}", f"data.split_dir={split_dir}", "model.mode=features",
                             "selmix.setting=semi", *extra])
    data = train_data(cfg, torch.device("cpu"))
    data.validate(cfg.data.num_classes)
    return data


def _edit(path: Path, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def test_unedited_lists_train_on_the_cache(split_and_cache):
    split_dir, cache = split_and_cache
    data = _data(split_dir, cache)
    labels = torch.tensor([int(x) for x in (split_dir / "val.txt").read_text().split()[1::2]])
    assert torch.equal(data.val.labels, labels) and data.num_classes == K


def test_a_label_outside_k_in_the_list_is_refused_naming_file_and_row(split_and_cache):
    split_dir, cache = split_and_cache
    _edit(split_dir / "val.txt", lambda lines: [lines[0], f"{lines[1].split()[0]} 12\n", *lines[2:]])
    with pytest.raises(ValueError, match=r"val\.txt: row 1 \('\d+'\) has label 12 outside \[0, 10\)"):
        _data(split_dir, cache)


def test_a_changed_label_within_k_is_refused_naming_split_row_and_both_values(split_and_cache):
    split_dir, cache = split_and_cache
    item, old = (split_dir / "val.txt").read_text().splitlines()[3].split()
    new = (int(old) + 1) % K
    _edit(split_dir / "val.txt", lambda lines: [*lines[:3], f"{item} {new}\n", *lines[4:]])
    with pytest.raises(ValueError, match=rf"split 'val' row 3 \('{item}'\): label {new} in .*val\.txt, {old} in "
                                         r"the feature cache"):
        _data(split_dir, cache)


def test_a_class_removed_from_val_is_refused_naming_the_class(split_and_cache):
    split_dir, cache = split_and_cache
    _edit(split_dir / "val.txt", lambda lines: [ln for ln in lines if ln.split()[1] != "7"])
    with pytest.raises(ValueError, match=r"val\.txt has no sample of class\(es\) 'class_7' \(label 7\)"):
        _data(split_dir, cache)


def test_an_emptied_unlabeled_list_is_refused(split_and_cache):
    split_dir, cache = split_and_cache
    (split_dir / "unlabeled.txt").write_text("")
    with pytest.raises(ValueError, match=r"unlabeled\.txt of split 'unlabeled' is empty"):
        _data(split_dir, cache)


def test_a_reordered_list_is_refused_naming_the_item(split_and_cache):
    split_dir, cache = split_and_cache
    lines = (split_dir / "labeled.txt").read_text().splitlines(keepends=True)
    same_class = [i for i, ln in enumerate(lines) if ln.split()[1] == lines[0].split()[1]]
    a, b = same_class[:2]  # same label, so only the items differ
    lines[a], lines[b] = lines[b], lines[a]
    (split_dir / "labeled.txt").write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"split 'labeled' row {a}: item {int(lines[a].split()[0])} in .*, "
                                         rf"{int(lines[b].split()[0])} in the feature cache"):
        _data(split_dir, cache)


def test_a_missing_list_file_is_named(split_and_cache):
    split_dir, cache = split_and_cache
    (split_dir / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split list .*test\.txt of split 'test' is missing"):
        _data(split_dir, cache)


def test_a_cache_without_the_list_digest_is_verified_row_by_row(split_and_cache, tmp_path):
    """A cache whose split hash is of its rows (extracted from a source, or before lists were checked) is
    accepted when every row agrees, and refused at the first row that does not."""
    split_dir, _ = split_and_cache
    labels = torch.as_tensor(np.repeat(np.arange(K), 12))
    old = tmp_path / "old_cache"
    for name in SPLIT_NAMES:
        split = load_split(split_dir, name)
        extract_features(PositionSource(labels), split.items, split.labels, FunctionBackbone(_rows, 2, "table"),
                         old, name, num_workers=0, device="cpu", chunk_size=16, progress=False)
    assert torch.equal(_data(split_dir, old).test.labels, load_split(split_dir, "test").labels)
    item, label = (split_dir / "test.txt").read_text().splitlines()[0].split()
    _edit(split_dir / "test.txt", lambda lines: [f"{item} {(int(label) + 1) % K}\n", *lines[1:]])
    with pytest.raises(ValueError, match=r"split 'test' row 0 .* in the feature cache"):
        _data(split_dir, old)
