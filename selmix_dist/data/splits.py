"""Long-tailed semi-supervised splits (docs/method.md §1.2) and the split-list files that record them.

Class rank k (k = 0 is the head; ``class_order[k]`` is its source label, default the source's own order)
gets ``n_k = ⌊N1 · ρ^(−k/(K−1))⌋`` images (``long_tailed_counts``). The labeled set uses (N1, ρ_l), the
unlabeled set (M1, ρ_u); ρ_u = 1 gives a flat and ρ_u < 1 an inverted unlabeled distribution. Each class is
shuffled once by its own numpy Generator (seeded from ``derive_seed(seed, "lt_split", label)``) and cut, in
this order, into a balanced validation part (n_val), the labeled part, the unlabeled part and, without a
separate test source, a held-out test part (n_test) — so all four are disjoint, and the validation and
labeled sets do not change when only the unlabeled parameters do.

A split directory holds ``labeled.txt``, ``unlabeled.txt`` (label −1), ``val.txt``, ``test.txt`` with
``item label`` lines — the item is the source-relative path for file-backed sources, else the position in
the source — plus ``split.json`` (parameters, seed, sources, per-class counts, sha256 of every file). The
true labels of the unlabeled set exist only in ``unlabeled_true_labels.diagnostic.txt``, read by
``load_unlabeled_true_labels`` and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from selmix_dist import atomic
from selmix_dist.core.rng import derive_seed
from selmix_dist.data.sources import ArraySource, ImageSource, open_source, read_list_file

__all__ = [
    "DIAGNOSTIC_FILE",
    "MANIFEST",
    "SPLIT_NAMES",
    "SplitList",
    "assign_lt_split",
    "load_manifest",
    "load_split",
    "load_unlabeled_true_labels",
    "long_tailed_counts",
    "make_lt_split",
    "open_split_source",
    "read_split_list",
    "resolve_class_order",
]

SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")
MANIFEST = "split.json"
DIAGNOSTIC_FILE = "unlabeled_true_labels.diagnostic.txt"
FORMAT = "selmix_dist.lt_split/1"


def _floor_lt(n_max: int, ratio: Fraction, k: int, e: int) -> int:
    """⌊n_max · ratio^(−k/e)⌋ exactly, for the exact rational value of ``ratio``."""
    approx = n_max * float(ratio) ** (-k / e)
    nearest = round(approx)
    # The float estimate is off by ~1e-15 relatively; only a value this close to an integer can floor wrongly.
    if abs(approx - nearest) > 1e-9 * max(1.0, approx):
        return math.floor(approx)
    # nearest <= n_max·(q/p)^(k/e)  <=>  nearest^e · p^k <= n_max^e · q^k   (ratio = p/q, all integers)
    p, q = ratio.numerator, ratio.denominator
    return nearest if nearest**e * p**k <= n_max**e * q**k else nearest - 1


def long_tailed_counts(n_max: int, ratio: float, num_classes: int) -> list[int]:
    """Per-rank counts ``n_k = ⌊n_max · ratio^(−k/(K−1))⌋``, k = 0 … K−1 (docs/method.md §1.2).

    Evaluated exactly for the float64 value of ``ratio``. This reproduces every count of the doc's table,
    including ρ_u = 1/100: float64(0.01) is slightly above 1/100, so the last count is ⌊30/0.01⌋ = 2999.
    The doc's clips are implied: the floor of a monotone sequence ending at n_max/ratio stays at or above
    ``⌊n_max/ratio⌋`` for ratio ≥ 1 and at or below it for ratio ≤ 1.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 0:
        raise ValueError(f"n_max must be a non-negative integer, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"imbalance ratio must be positive and finite, got {ratio!r}")
    if num_classes == 1:
        return [int(n_max)]
    exact = Fraction(ratio)
    return [_floor_lt(int(n_max), exact, k, num_classes - 1) for k in range(num_classes)]


def resolve_class_order(class_order: Sequence[int | str] | None, class_names: Sequence[str]) -> list[int]:
    """Source labels from head (rank 0) to tail: a permutation given by label ids or class names."""
    num_classes = len(class_names)
    if class_order is None:
        return list(range(num_classes))
    ids = {name: k for k, name in enumerate(class_names)}
    order = []
    for entry in class_order:
        if isinstance(entry, str) and not entry.lstrip("-").isdigit():
            if entry not in ids:
                raise ValueError(f"class_order: unknown class name {entry!r}")
            order.append(ids[entry])
        else:
            label = int(entry)
            if not 0 <= label < num_classes:
                raise ValueError(f"class_order: class id {label} outside [0, {num_classes})")
            order.append(label)
    if sorted(order) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(order))
        raise ValueError(f"class_order must name each of the {num_classes} classes once; "
                         f"missing {[class_names[m] for m in missing]}, {len(order)} entries given")
    return order


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def assign_lt_split(labels: torch.Tensor | np.ndarray, *, num_classes: int, n1: int, rho_l: float, m1: int,
                    rho_u: float, n_val: int, seed: int, n_test: int = 0,
                    class_order: Sequence[int | str] | None = None,
                    class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Disjoint source positions (sorted int64 arrays) of the ``labeled``, ``unlabeled``, ``val`` and
    ``test`` parts for source labels int64[N] (``test`` is empty when n_test = 0).

    Raises ValueError naming the class when a class cannot fill its validation part or its quota.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for num_classes={num_classes}")
    n_val = _check_count("n_val", n_val, 1)
    n_test = _check_count("n_test", n_test, 0)
    seed = _check_count("seed", seed, 0)
    order = resolve_class_order(class_order, names)
    labeled = long_tailed_counts(_check_count("n1", n1, 1), rho_l, num_classes)
    unlabeled = long_tailed_counts(_check_count("m1", m1, 0), rho_u, num_classes)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"source labels must lie in [0, {num_classes})")
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for rank, label in enumerate(order):
        members = by_class[starts[label]:starts[label + 1]]
        name = f"{names[label]!r} (label {label})"
        if len(members) == 0:
            raise ValueError(f"validation class {name} is empty: the source has no images of it")
        quota = {"val": n_val, "labeled": labeled[rank], "unlabeled": unlabeled[rank], "test": n_test}
        if len(members) < sum(quota.values()):
            raise ValueError(f"class {name} has {len(members)} images, the split needs {sum(quota.values())} "
                             f"({', '.join(f'{k} {v}' for k, v in quota.items())})")
        shuffled = np.random.default_rng(derive_seed(seed, "lt_split", int(label))).permutation(members)
        cut = 0
        for part, count in quota.items():
            parts[part].append(shuffled[cut:cut + count])
            cut += count
    return {part: np.sort(np.concatenate(chunks)).astype(np.int64) for part, chunks in parts.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_record(source: ImageSource) -> dict[str, Any]:
    """How the manifest names a source: its reopen spec (path None when in memory) plus size checks."""
    record = source.spec() or {"kind": source.kind, "path": None, "options": {}}
    record = {**record, "num_samples": len(source), "items": "path" if source.paths is not None else "index"}
    if record["path"] is None and isinstance(source, ArraySource):
        record["sha256"] = source.fingerprint()
    return record


def _write_list(path: Path, items: Sequence[str], labels: np.ndarray) -> str:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(f"{item} {int(label)}\n" for item, label in zip(items, labels, strict=True))
    return _sha256(path)


def make_lt_split(source: ImageSource, out_dir: str | Path, *, n1: int, rho_l: float, m1: int, rho_u: float,
                  n_val: int, seed: int, test_source: ImageSource | None = None, n_test: int = 0,
                  class_order: Sequence[int | str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Draw the long-tailed split of ``source``, write the list files and ``split.json``; return the manifest.

    The test set is the whole ``test_source`` (same class names required) or, without one, ``n_test`` held-out
    images per class of ``source``. Labels in every file are the source's labels; ``class_order`` only
    decides which class gets which long-tailed quota.
    """
    if (test_source is None) == (n_test == 0):
        raise ValueError("give either test_source or n_test > 0 (held-out test images per class), not both")
    if test_source is not None and list(test_source.class_names) != list(source.class_names):
        raise ValueError(f"test source classes {list(test_source.class_names)[:5]}… differ from the source's "
                         f"{list(source.class_names)[:5]}…")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out_dir / MANIFEST} exists; pass --overwrite (overwrite=True from Python) to "
                              "replace the split")
    sources = {"train": source} if test_source is None else {"train": source, "test": test_source}
    true_labels = {role: src.labels().numpy() for role, src in sources.items()}
    parts = assign_lt_split(true_labels["train"], num_classes=source.num_classes, n1=n1, rho_l=rho_l, m1=m1,
                            rho_u=rho_u, n_val=n_val, seed=seed, n_test=n_test, class_order=class_order,
                            class_names=source.class_names)
    lists, counts = {}, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        role = "test" if name == "test" and test_source is not None else "train"
        src = sources[role]
        idx = np.arange(len(src)) if role == "test" else parts[name]
        items = [src.paths[i] for i in idx] if src.paths is not None else [str(int(i)) for i in idx]
        true = true_labels[role][idx]
        shown = np.full(len(idx), -1) if name == "unlabeled" else true
        lists[name] = {"file": f"{name}.txt", "source": role, "count": len(idx),
                       "sha256": _write_list(out_dir / f"{name}.txt", items, shown)}
        per_class = np.bincount(true, minlength=source.num_classes).tolist()
        if name == "unlabeled":
            # The only place the hidden labels are written; its name says what it is for.
            diagnostic = {"file": DIAGNOSTIC_FILE, "source": role, "unlabeled_counts": per_class,
                          "sha256": _write_list(out_dir / DIAGNOSTIC_FILE, items, true)}
        else:
            counts[name] = per_class
    manifest = {
        "format": FORMAT,
        "params": {"n1": int(n1), "rho_l": float(rho_l), "m1": int(m1), "rho_u": float(rho_u),
                   "n_val": int(n_val), "n_test": int(n_test), "seed": int(seed),
                   "class_order": resolve_class_order(class_order, source.class_names)},
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "sources": {role: _source_record(src) for role, src in sources.items()},
        "lists": lists,
        "counts": counts,
        "diagnostic": diagnostic,
    }
    atomic.write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(split_dir: str | Path) -> dict[str, Any]:
    """The parsed ``split.json`` of a split directory (ValueError if it is not one of ours)."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"split manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt split manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    return manifest


class SplitList(NamedTuple):
    """One split list: items (list[str] of source-relative paths, or int64[N] source positions), labels
    int64[N] (−1 for the unlabeled split), the list file's sha256 and the directory's manifest."""

    items: list[str] | torch.Tensor
    labels: torch.Tensor
    sha256: str
    manifest: dict[str, Any]


def _read_checked(split_dir: Path, entry: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    path = split_dir / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    if _sha256(path) != entry["sha256"]:
        raise ValueError(f"split list {path} was modified after the split was made (sha256 differs from "
                         f"{split_dir / MANIFEST}); remake the split instead of editing it")
    return read_list_file(path)


def _positions(items: list[str], record: dict[str, Any], source: ImageSource | None,
               where: Path) -> torch.Tensor:
    """Source positions int64[N] of list items (positions already, or paths looked up in ``source``)."""
    if source is not None and len(source) != record["num_samples"]:
        raise ValueError(f"{where} was made from a source of {record['num_samples']} items; "
                         f"the given source has {len(source)}")
    if record["items"] == "index":
        return torch.tensor([int(i) for i in items], dtype=torch.int64)
    if source is None or source.paths is None:
        raise ValueError(f"{where} lists file paths; pass the file-backed source they are relative to")
    lookup = {p: i for i, p in enumerate(source.paths)}
    missing = [p for p in items if p not in lookup]
    if missing:
        raise ValueError(f"{where}: path {missing[0]!r} is not in the given source ({len(missing)} missing)")
    return torch.tensor([lookup[p] for p in items], dtype=torch.int64)


def load_split(split_dir: str | Path, name: str, source: ImageSource | None = None) -> SplitList:
    """Read split list ``name`` (labeled / unlabeled / val / test) after checking its sha256.

    Items are int64 source positions for index lists, or when ``source`` (the source the list refers to,
    e.g. from ``open_split_source``) is given; otherwise the relative paths as written.
    """
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    if name not in manifest["lists"]:
        raise ValueError(f"{split_dir} has no split list {name!r} (has {sorted(manifest['lists'])})")
    entry = manifest["lists"][name]
    items, labels = _read_checked(split_dir, entry)
    record = manifest["sources"][entry["source"]]
    if record["items"] == "index" or source is not None:
        items = _positions(items, record, source, split_dir / entry["file"])
    return SplitList(items, torch.from_numpy(labels), entry["sha256"], manifest)


def read_split_list(split_dir: str | Path, name: str) -> SplitList:
    """Split list ``name`` as the user's file now holds it (no sha256 check against ``split.json``), checked
    for what training needs: the file exists, it lists at least one item, its labels lie in [0, K) (−1 in the
    unlabeled list), and the validation list has every class. Items are the list's strings (paths or
    positions, as written); ``sha256`` is the file's current one. Errors name the file, row and class.
    """
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    if name not in manifest["lists"]:
        raise ValueError(f"{split_dir} has no split list {name!r} (has {sorted(manifest['lists'])})")
    path = split_dir / manifest["lists"][name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} of split {name!r} is missing (listed in {split_dir / MANIFEST})")
    items, labels = read_list_file(path)
    if not items:
        raise ValueError(f"split list {path} of split {name!r} is empty: training needs at least one item")
    k, names = int(manifest["num_classes"]), manifest["class_names"]
    low = -1 if name == "unlabeled" else 0
    bad = np.flatnonzero((labels < low) | (labels >= k))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"split list {path}: row {row} ({items[row]!r}) has label {int(labels[row])} outside "
                         f"[{low}, {k}) (K = {k} classes in {split_dir / MANIFEST})")
    if name == "val":
        empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0).tolist()
        if empty:
            listed = [f"{names[c]!r} (label {c})" for c in empty[:5]]
            raise ValueError(f"split list {path} has no sample of class(es) {', '.join(listed)}"
                             f"{' and more' if len(empty) > 5 else ''}: prototypes and recalls need at least one")
    return SplitList(items, torch.from_numpy(labels), _sha256(path), manifest)


def open_split_source(split_dir: str | Path, name: str) -> ImageSource:
    """Reopen the source split list ``name`` refers to (the train or the test source) from the manifest."""
    manifest = load_manifest(split_dir)
    if name not in manifest["lists"]:
        raise ValueError(f"{split_dir} has no split list {name!r} (has {sorted(manifest['lists'])})")
    record = manifest["sources"][manifest["lists"][name]["source"]]
    if record["path"] is None:
        raise ValueError(f"split list {name!r} of {split_dir} indexes an in-memory {record['kind']} source "
                         "that cannot be reopened; pass that source to load_split")
    source = open_source(record["kind"], record["path"], **record["options"])
    if len(source) != record["num_samples"]:
        raise ValueError(f"source {record['path']} now has {len(source)} items; split {split_dir} was made "
                         f"from {record['num_samples']}")
    return source


def load_unlabeled_true_labels(
    split_dir: str | Path, source: ImageSource | None = None
) -> tuple[list[str] | torch.Tensor, torch.Tensor]:
    """DIAGNOSTICS ONLY: the hidden true labels of the unlabeled split, as (items, int64[N] labels).

    Training code must not call this (the semi-supervised protocol hides these labels); it exists to
    measure pseudo-label quality or to reproduce the release's label leak (docs/method.md §1.3) on purpose.
    """
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    entry = manifest["diagnostic"]
    items, labels = _read_checked(split_dir, entry)
    record = manifest["sources"][entry["source"]]
    if record["items"] == "index" or source is not None:
        items = _positions(items, record, source, split_dir / entry["file"])
    return items, torch.from_numpy(labels)
