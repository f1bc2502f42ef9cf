"""selmix_dist.data.splits: long-tailed counts (method doc §1.2), split assignment, files, manifest."""

from __future__ import annotations

import decimal
import hashlib
import importlib.util
import json
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from selmix_dist.data.sources import ArraySource, ImageFolderSource
from selmix_dist.data.splits import (
    DIAGNOSTIC_FILE,
    assign_lt_split,
    load_manifest,
    load_split,
    load_unlabeled_true_labels,
    long_tailed_counts,
    make_lt_split,
    open_split_source,
)

REPO = Path(__file__).resolve().parents[2]

# Method doc §1.2 table (CIFAR-10/100-LT, STL-10, ImageNet-100): (N1, ρ, K) -> per-class counts or total.
DOC_LISTS = {
    (1500, 100, 10): [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15],
    (450, 10, 10): [450, 348, 269, 208, 161, 125, 96, 75, 58, 45],
    (3000, 1, 10): [3000] * 10,
}
DOC_TOTALS = {(1500, 100, 10): 3720, (3000, 100, 10): 7443, (3000, 1, 10): 30_000, (30, 0.01, 10): 7442,
              (150, 10, 100): 5835, (300, 10, 100): 11_720, (450, 10, 10): 1835, (433, 10, 100): 16_945,
              (866, 10, 100): 33_939}


@pytest.mark.parametrize("args", sorted(DOC_TOTALS, key=str))
def test_counts_reproduce_the_method_doc_table(args):
    counts = long_tailed_counts(*args)
    assert sum(counts) == DOC_TOTALS[args]
    if args in DOC_LISTS:
        assert counts == DOC_LISTS[args]


def test_cifar10_unlabeled_profiles():
    assert long_tailed_counts(3000, 100, 10)[::9] == [3000, 30]
    inverted = long_tailed_counts(30, 1 / 100, 10)
    assert inverted[:2] == [30, 50] and inverted[-1] == 2999
    assert inverted == sorted(inverted)


def _exact_floor(n_max: int, ratio: float, k: int, e: int) -> int:
    """The largest n with n ≤ n_max·ratio^(−k/e) (ratio = p/q exactly): n^e·p^k ≤ n_max^e·q^k in integers,
    searched upwards from a start that is checked to satisfy it."""
    p, q = Fraction(ratio).numerator, Fraction(ratio).denominator
    n = max(0, int(n_max * ratio ** (-k / e)) - 3)
    assert n**e * p**k <= n_max**e * q**k
    while (n + 1) ** e * p**k <= n_max**e * q**k:
        n += 1
    return n


@pytest.mark.parametrize("ratio", [100, 10, 3, 1, 0.5, 0.01, 1 / 3, 256, 1000])
@pytest.mark.parametrize("num_classes", [2, 3, 4, 7, 10])
def test_counts_are_the_exact_floor(ratio, num_classes):
    for n_max in (1, 30, 64, 450, 1500):
        got = long_tailed_counts(n_max, ratio, num_classes)
        e = num_classes - 1
        assert got == [_exact_floor(n_max, ratio, k, e) for k in range(num_classes)], (n_max, ratio)
        bound = int(Fraction(n_max) / Fraction(ratio))  # ⌊N1/ρ⌋: the doc's clip
        assert all(c >= bound for c in got) if ratio >= 1 else all(c <= bound for c in got)


def test_counts_match_high_precision_for_many_classes():
    with decimal.localcontext(prec=60):
        for n_max, ratio, num_classes in ((500, 50, 1000), (1000, 1000, 8142), (300, 0.1, 365)):
            got = long_tailed_counts(n_max, ratio, num_classes)
            rho = Decimal(Fraction(ratio).numerator) / Decimal(Fraction(ratio).denominator)
            for k in range(1, num_classes - 1, 37):  # interior ranks: never an exact integer here
                value = n_max * rho ** (Decimal(-k) / Decimal(num_classes - 1))
                assert got[k] == int(value.to_integral_value(rounding=decimal.ROUND_FLOOR)), (ratio, k)


def test_counts_reject_bad_arguments():
    for bad in ((-1, 10, 10), (10, 0, 10), (10, float("inf"), 10), (10, 10, 0), (1.5, 10, 10)):
        with pytest.raises(ValueError):
            long_tailed_counts(*bad)
    assert long_tailed_counts(7, 10, 1) == [7]


# ------------------------------------------------------------------------------------------ assignment

CIFAR_LIKE = dict(num_classes=10, n1=1500, rho_l=100, m1=3000, rho_u=100, n_val=500)


def _cifar_like_labels(seed: int = 0) -> np.ndarray:
    """5000 images per class, classes interleaved at random positions."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 5000))


def _check_parts(parts, labels, expected):
    seen = np.concatenate(list(parts.values()))
    assert len(np.unique(seen)) == len(seen), "parts overlap"
    for name, counts in expected.items():
        assert np.bincount(labels[parts[name]], minlength=len(counts)).tolist() == counts, name


@pytest.mark.parametrize("m1, rho_u", [(3000, 100), (3000, 1), (30, 1 / 100)])
def test_assignment_counts_and_disjointness(m1, rho_u):
    labels = _cifar_like_labels()
    parts = assign_lt_split(labels, **{**CIFAR_LIKE, "m1": m1, "rho_u": rho_u}, seed=3)
    _check_parts(parts, labels, {"val": [500] * 10, "labeled": DOC_LISTS[(1500, 100, 10)],
                                 "unlabeled": long_tailed_counts(m1, rho_u, 10), "test": [0] * 10})
    assert len(parts["unlabeled"]) == {100: 7443, 1: 30_000, 0.01: 7442}[rho_u]


def test_assignment_is_a_function_of_the_seed():
    labels = _cifar_like_labels()
    a = assign_lt_split(labels, **CIFAR_LIKE, seed=0)
    b = assign_lt_split(labels, **CIFAR_LIKE, seed=0)
    c = assign_lt_split(labels, **CIFAR_LIKE, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["labeled"], c["labeled"]) and not np.array_equal(a["val"], c["val"])
    flat = assign_lt_split(labels, **{**CIFAR_LIKE, "rho_u": 1}, seed=0)
    # val and labeled are cut before the unlabeled part, so they do not depend on the unlabeled profile
    assert np.array_equal(a["val"], flat["val"]) and np.array_equal(a["labeled"], flat["labeled"])


def test_class_order_assigns_quotas_by_rank():
    labels = _cifar_like_labels()
    names = [f"c{k}" for k in range(10)]
    order = ["c3", 7, 0, 1, 2, 4, 5, 6, 8, 9]
    parts = assign_lt_split(labels, **{**CIFAR_LIKE, "m1": 2000}, seed=0, n_test=10, class_order=order,
                            class_names=names)
    quota = DOC_LISTS[(1500, 100, 10)]
    by_label = np.bincount(labels[parts["labeled"]], minlength=10)
    assert [by_label[3], by_label[7], by_label[0]] == quota[:3]
    assert by_label[9] == quota[9]
    _check_parts(parts, labels, {"test": [10] * 10, "val": [500] * 10})
    for bad, message in ((["zebra"] + list(range(1, 10)), "unknown class name 'zebra'"),
                         ([0] * 10, r"missing \['c1'"), (list(range(11)), "class id 10 outside")):
        with pytest.raises(ValueError, match=message):
            assign_lt_split(labels, **CIFAR_LIKE, seed=0, class_order=bad, class_names=names)


def test_empty_or_short_classes_are_named():
    labels = np.repeat([0, 2], 40)  # class 1 has no image
    small = dict(num_classes=3, n1=10, rho_l=10, m1=0, rho_u=1, n_val=5)
    with pytest.raises(ValueError, match=r"validation class 'bird' \(label 1\) is empty"):
        assign_lt_split(labels, **small, seed=0, class_names=["ant", "bird", "cat"])
    labels = np.repeat([0, 1, 2], [40, 40, 5])  # quotas [10, 3, 1] + 5 val
    with pytest.raises(ValueError, match=r"class 'cat' \(label 2\) has 5 images, the split needs 6"):
        assign_lt_split(labels, **small, seed=0, class_names=["ant", "bird", "cat"])
    with pytest.raises(ValueError, match="n_val must be an integer >= 1"):
        assign_lt_split(labels, **{**small, "n_val": 0}, seed=0)


# ------------------------------------------------------------------------------------ files and manifest


@pytest.fixture()
def array_source():
    """10 classes × 40 tiny images whose pixel value encodes the position (so items are traceable)."""
    labels = np.repeat(np.arange(10), 40)
    images = np.broadcast_to(np.arange(400, dtype=np.uint8)[:, None, None, None], (400, 2, 2, 3)).copy()
    return ArraySource(images, labels, class_names=[f"k{i}" for i in range(10)])


SMALL = dict(n1=20, rho_l=10, m1=3, rho_u=1 / 10, n_val=3, seed=5)


def test_split_files_manifest_and_hidden_labels(array_source, tmp_path):
    manifest = make_lt_split(array_source, tmp_path, **SMALL, n_test=2)
    assert manifest == load_manifest(tmp_path)
    for entry in [*manifest["lists"].values(), manifest["diagnostic"]]:
        assert hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    labels = array_source.labels()
    got = {name: load_split(tmp_path, name) for name in ("labeled", "unlabeled", "val", "test")}
    positions = torch.cat([s.items for s in got.values()])
    assert len(torch.unique(positions)) == len(positions)
    for name in ("labeled", "val", "test"):
        assert torch.equal(got[name].labels, labels[got[name].items])
        assert np.bincount(got[name].labels, minlength=10).tolist() == manifest["counts"][name]
    assert manifest["counts"]["labeled"] == long_tailed_counts(20, 10, 10)
    assert manifest["counts"]["val"] == [3] * 10 and manifest["counts"]["test"] == [2] * 10
    assert (got["unlabeled"].labels == -1).all()
    assert "-1" not in (tmp_path / "labeled.txt").read_text().split()
    items, true = load_unlabeled_true_labels(tmp_path)
    assert torch.equal(items, got["unlabeled"].items) and torch.equal(true, labels[items])
    assert np.bincount(true, minlength=10).tolist() == long_tailed_counts(3, 0.1, 10)
    assert manifest["params"] == {**SMALL, "rho_u": 0.1, "n_test": 2, "class_order": list(range(10))}
    assert manifest["sources"]["train"]["path"] is None
    assert manifest["sources"]["train"]["sha256"] == array_source.fingerprint()
    with pytest.raises(ValueError, match="in-memory array source"):
        open_split_source(tmp_path, "val")


def test_same_seed_same_files_other_seed_other_files(array_source, tmp_path):
    a = make_lt_split(array_source, tmp_path / "a", **SMALL, n_test=2)
    b = make_lt_split(array_source, tmp_path / "b", **SMALL, n_test=2)
    c = make_lt_split(array_source, tmp_path / "c", **{**SMALL, "seed": 6}, n_test=2)
    assert a["lists"] == b["lists"]
    assert a["lists"]["labeled"]["sha256"] != c["lists"]["labeled"]["sha256"]


def test_edited_list_and_overwrite_are_refused(array_source, tmp_path):
    make_lt_split(array_source, tmp_path, **SMALL, n_test=2)
    with pytest.raises(FileExistsError, match="split.json exists"):
        make_lt_split(array_source, tmp_path, **SMALL, n_test=2)
    val = tmp_path / "val.txt"
    val.write_text(val.read_text().replace(" 0\n", " 1\n", 1))
    with pytest.raises(ValueError, match=r"split list .*val.txt was modified"):
        load_split(tmp_path, "val")
    (tmp_path / DIAGNOSTIC_FILE).write_text("0 3\n")
    with pytest.raises(ValueError, match="unlabeled_true_labels.diagnostic.txt was modified"):
        load_unlabeled_true_labels(tmp_path)
    with pytest.raises(ValueError, match=r"has no split list 'train'"):
        load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="either test_source or n_test"):
        make_lt_split(array_source, tmp_path / "x", **SMALL)


def test_path_lists_for_a_folder_with_a_separate_test_source(small_image_folder, tmp_path):
    source = ImageFolderSource(small_image_folder)
    manifest = make_lt_split(source, tmp_path, n1=12, rho_l=4, m1=6, rho_u=1, n_val=2, seed=0,
                             test_source=source)
    first = (tmp_path / "labeled.txt").read_text().splitlines()[0].rsplit(" ", 1)
    assert first[0] in source.paths and int(first[1]) == source.class_names.index(first[0].split("/")[0])
    raw = load_split(tmp_path, "labeled")
    assert isinstance(raw.items, list) and all(p in source.paths for p in raw.items)
    reopened = open_split_source(tmp_path, "labeled")
    assert isinstance(reopened, ImageFolderSource) and reopened.paths == source.paths
    split = load_split(tmp_path, "labeled", reopened)
    assert [source.paths[i] for i in split.items] == raw.items
    assert torch.equal(split.labels, source.labels()[split.items])
    test = load_split(tmp_path, "test", source)
    assert torch.equal(test.items, torch.arange(len(source)))
    assert manifest["lists"]["test"]["source"] == "test" and manifest["counts"]["test"] == [30] * 10
    image, label = reopened[int(split.items[0])]
    assert label == int(split.labels[0]) and image.size == (32, 32)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_lt_split_tool(small_image_folder, tmp_path, capsys):
    out = tmp_path / "split"
    assert _tool("make_lt_split").main(["--kind", "imagefolder", "--source", str(small_image_folder),
                                        "--out", str(out), "--n1", "12", "--rho-l", "4", "--m1", "4",
                                        "--rho-u", "1/4", "--n-val", "2", "--n-test", "3", "--seed", "1",
                                        "--class-order", ",".join(reversed(ImageFolderSource(
                                            small_image_folder).class_names))]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["params"]["rho_u"] == 0.25 and manifest["params"]["class_order"] == list(range(9, -1, -1))
    assert manifest["counts"]["labeled"] == long_tailed_counts(12, 4, 10)[::-1]
    assert f"labeled {sum(manifest['counts']['labeled'])}" in " ".join(printed.split())


@pytest.mark.slow
def test_cifar10_lt_split_reproduces_the_paper_counts(cifar10_root, tmp_path):
    train = ImageFolderSource(cifar10_root / "train")
    test = ImageFolderSource(cifar10_root / "test")
    manifest = make_lt_split(train, tmp_path, n1=1500, rho_l=100, m1=3000, rho_u=100, n_val=500, seed=0,
                             test_source=test)
    assert manifest["counts"]["labeled"] == DOC_LISTS[(1500, 100, 10)]
    assert manifest["diagnostic"]["unlabeled_counts"] == [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30]
    assert manifest["counts"]["val"] == [500] * 10 and manifest["counts"]["test"] == [1000] * 10
    paths = [p for name in ("labeled", "unlabeled", "val") for p in load_split(tmp_path, name).items]
    assert len(paths) == 3720 + 7443 + 5000 == len(set(paths))
    labels = train.labels().numpy()
    for m1, rho_u, total in ((3000, 1, 30_000), (30, 0.01, 7442)):
        parts = assign_lt_split(labels, **{**CIFAR_LIKE, "m1": m1, "rho_u": rho_u}, seed=0)
        _check_parts(parts, labels, {"labeled": DOC_LISTS[(1500, 100, 10)],
                                     "unlabeled": long_tailed_counts(m1, rho_u, 10)})
        assert len(parts["unlabeled"]) == total
