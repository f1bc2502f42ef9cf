"""selmix_dist.report: run-directory report (JSON / CSV / markdown / plots) and tools/report.py."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selmix_dist.core.metrics import METRIC_NAMES
from selmix_dist.report import (
    PLOTS,
    bin_matrix,
    bin_vector,
    frequency_bins,
    head_test_records,
    markdown_table,
    write_report,
)

ROOT = Path(__file__).resolve().parents[2]
TARGET = "min_recall"


def make_run_dir(path: Path, k: int, val_target: dict[int, float], test_steps: list[int],
                 seed: int = 0) -> dict:
    """Write a complete synthetic run directory; return the records it wrote, keyed by (step, split)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tb").mkdir()
    (path / "checkpoints").mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": TARGET}, "run": {"seed": seed}}))
    counts = [int(500 * 0.9 ** i) + 1 for i in range(k)]
    rng.shuffle(counts)  # class index order != frequency order, so sorting by frequency matters
    meta = {"class_names": [f"c{i}" for i in range(k)], "train_class_counts": counts,
            "objective": TARGET, "target_metric": TARGET, "num_classes": k}
    (path / "meta.json").write_text(json.dumps(meta))
    records = {}
    lines = []
    for step in sorted(set(val_target) | set(test_steps)):
        for split in ("val", "test"):
            if (split == "val" and step not in val_target) or (split == "test" and step not in test_steps):
                continue
            metrics = {name: float(rng.uniform()) for name in METRIC_NAMES}
            metrics["empty_classes"] = 0
            if split == "val":
                metrics[TARGET] = val_target[step]
            rec = {"step": step, "split": split, "metrics": metrics,
                   "per_class_recall": rng.uniform(size=k).tolist()}
            records[(step, split)] = rec
            lines.append(json.dumps(rec))
    (path / "history.jsonl").write_text("\n".join(lines) + "\n")
    for name, step in (("first", 0), ("last", max(val_target))):
        p = torch.from_numpy(rng.gamma(0.3, size=(k, k))).to(torch.float32)
        torch.save({"step": step, "P": p / p.sum(), "G": torch.randn(k, k)}, path / f"distribution_{name}.pt")
    return records


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_report_values_match_history(tmp_path):
    run = tmp_path / "run"
    # val best is a tie between steps 100 and 150 -> the earliest (100); the test set was evaluated there.
    val_target = {0: 0.2, 50: 0.5, 100: 0.7, 150: 0.7, 200: 0.6}
    records = make_run_dir(run, k=12, val_target=val_target, test_steps=[0, 100, 200])
    report = write_report(run)

    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["best_step"] == report["best_step"] == 100
    assert on_disk["best_test_step"] == 100
    assert on_disk["target_metric"] == TARGET and on_disk["objective"] == TARGET
    assert on_disk["config"]["run"]["seed"] == 0
    for split, first, last in (("val", 0, 200), ("test", 0, 200)):
        s = on_disk["splits"][split]
        assert s["first"]["step"] == first and s["last"]["step"] == last and s["best"]["step"] == 100
        for which in ("first", "last", "best"):
            rec = records[(s[which]["step"], split)]
            assert s[which]["metrics"] == rec["metrics"]
            assert s[which]["per_class_recall"] == rec["per_class_recall"]

    with open(run / "report.csv", newline="") as fh:
        rows = {row["metric"]: row for row in csv.DictReader(fh)}
    assert list(rows) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        for split in ("val", "test"):
            for which, step in (("first", 0), ("last", 200), ("best", 100)):
                assert float(rows[name][f"{split}_{which}"]) == pytest.approx(
                    records[(step, split)]["metrics"][name], abs=1e-12)

    md = (run / "report.md").read_text()
    assert "| metric | val first | val last | val best | test first | test last | test best |" in md
    r = {w: records[(s, "val")]["metrics"][TARGET] for w, s in (("first", 0), ("last", 200), ("best", 100))}
    t = {w: records[(s, "test")]["metrics"][TARGET] for w, s in (("first", 0), ("last", 200), ("best", 100))}
    expected_row = (f"| {TARGET} | {r['first']:.4f} | {r['last']:.4f} | {r['best']:.4f} | "
                    f"{t['first']:.4f} | {t['last']:.4f} | {t['best']:.4f} |")
    assert expected_row in md
    assert "best step (max validation `min_recall`, ties → earliest): 100" in md
    for name in PLOTS:
        assert_png(run / name)
        assert f"]({name})" in md


def test_best_test_column_uses_best_validation_step_among_tested_steps(tmp_path):
    run = tmp_path / "run"
    # val best is step 150, where the test set was not evaluated; among the tested steps {0, 100, 200}
    # validation ranks 200 (0.7) above 100 (0.6), so test best is step 200 — chosen without test values.
    records = make_run_dir(run, k=5, val_target={0: 0.2, 50: 0.5, 100: 0.6, 150: 0.8, 200: 0.7},
                           test_steps=[0, 100, 200], seed=3)
    report = write_report(run)
    assert report["best_step"] == 150 and report["best_test_step"] == 200
    assert report["splits"]["val"]["best"]["metrics"] == records[(150, "val")]["metrics"]
    assert report["splits"]["test"]["best"]["metrics"] == records[(200, "test")]["metrics"]
    assert "test best is at step 200" in (run / "report.md").read_text()


def test_the_final_evaluation_of_the_best_head_is_filed_under_its_step():
    def rec(step, split, **extra):
        return {"step": step, "split": split, "metrics": {TARGET: step / 1000 + len(split)}, **extra}

    history = [rec(0, "val"), rec(0, "test"), rec(150, "val"), rec(250, "val"), rec(250, "test"),
               rec(250, "test_best", head_step=150)]
    assert head_test_records(history) == {0: history[1], 250: history[4], 150: {**history[5], "step": 150}}


def test_report_without_test_split_and_many_classes(tmp_path):
    run = tmp_path / "run"
    k = 450  # > MAX_BINS: the plots aggregate classes into 200 frequency bins
    make_run_dir(run, k=k, val_target={0: 0.1, 50: 0.3}, test_steps=[], seed=1)
    report = write_report(run)
    assert report["splits"]["test"] is None and report["best_test_step"] is None
    with open(run / "report.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["metric"] == TARGET)
    assert float(row["val_best"]) == 0.3 and row["test_best"] == ""
    for name in PLOTS:
        assert_png(run / name)


def test_frequency_bins_and_block_sums_match_brute_force():
    counts = [5, 50, 7, 50, 1, 30, 9]
    bin_of, nbins = frequency_bins(counts, max_bins=3)
    # descending stable order: 1 (50), 3 (50), 5 (30), 6 (9), 2 (7), 0 (5), 4 (1) -> sizes 3, 2, 2
    assert nbins == 3
    assert bin_of.tolist() == [2, 0, 1, 0, 2, 0, 1]
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(7, 7))
    blocks = bin_matrix(torch.from_numpy(p).to(torch.float32), bin_of, nbins)
    brute = np.zeros((3, 3))
    for i in range(7):
        for j in range(7):
            brute[bin_of[i], bin_of[j]] += p[i, j]
    np.testing.assert_allclose(blocks, brute, rtol=1e-6)
    values = rng.uniform(size=7)
    means = [np.mean([values[c] for c in range(7) if bin_of[c] == b]) for b in range(3)]
    np.testing.assert_allclose(bin_vector(values, bin_of, nbins), means, rtol=1e-12)
    assert frequency_bins(counts, max_bins=200)[1] == 7


def test_markdown_table_formatting():
    rows = [{"name": "a|b", "x": 0.123456, "n": 3}, {"name": "c", "x": None}]
    table = markdown_table(rows, ["name", "x", "n"], headers=["Name", "X", "N"])
    assert table == ("| Name | X | N |\n"
                     "|---|---|---|\n"
                     "| a\\|b | 0.1235 | 3 |\n"
                     "| c | — | — |\n")
    with pytest.raises(ValueError, match="2 headers"):
        markdown_table(rows, ["name", "x", "n"], headers=["a", "b"])


@pytest.mark.parametrize("missing", ["history.jsonl", "meta.json", "config.yaml", "distribution_last.pt"])
def test_incomplete_run_dir_names_missing_file(tmp_path, missing):
    run = tmp_path / "run"
    make_run_dir(run, k=4, val_target={0: 0.1, 50: 0.2}, test_steps=[0])
    (run / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        write_report(run)


def test_malformed_inputs_raise_value_errors(tmp_path):
    run = tmp_path / "run"
    make_run_dir(run, k=4, val_target={0: 0.1, 50: 0.2}, test_steps=[0])
    history = (run / "history.jsonl").read_text().splitlines()
    (run / "history.jsonl").write_text("\n".join(history[:2] + ["{not json"] + history[2:]) + "\n")
    with pytest.raises(ValueError, match=r"history\.jsonl:3"):
        write_report(run)
    (run / "history.jsonl").write_text("\n".join(history) + "\n")
    meta = json.loads((run / "meta.json").read_text())
    del meta["target_metric"]
    (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="target_metric"):
        write_report(run)


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("report_cli", ROOT / "tools" / "report.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run = tmp_path / "run"
    make_run_dir(run, k=4, val_target={0: 0.1, 50: 0.4}, test_steps=[0, 50])
    assert cli.main([str(run)]) == 0
    assert (run / "report.md").is_file() and "best step 50" in capsys.readouterr().out
    assert cli.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
