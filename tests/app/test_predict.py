"""tools/predict.py: top-k names and probabilities, parsed back from JSON / CSV, against independent references."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

from selmix_dist.data.splits import load_manifest
from selmix_dist.features.reader import load_features

REPO = Path(__file__).resolve().parents[2]
# Probabilities from images vs from cached features: softmax is 1/2-Lipschitz per entry in the max-norm of the
# logits, whose float32 differences stay below 1.4e-5 (see test_export.py); 1e-4 leaves a wide margin.
PROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def predict_main(tool):
    return tool("predict").main


def test_json_output_is_the_heads_top_k_on_cached_features(lite_run, lite_export, tmp_path):
    """The real CLI on a split list: rows in list order, names and probabilities of softmax(head(features))."""
    head = torch.load(lite_run["run"] / "checkpoints" / "best.pt", weights_only=True)["head"]
    fs = load_features(lite_run["cache"], "test")
    probs = torch.nn.functional.linear(fs.features, head["weight"], head["bias"]).softmax(1)
    names = load_manifest(lite_run["split"])["class_names"]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), str(lite_export),
                           str(lite_run["split"] / "test.txt"), "--root", str(lite_run["images"]), "--top-k", "3",
                           "--json", "--batch-size", "16"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predict" in proc.stderr  # the progress bar goes to stderr, never into the JSON
    rows = json.loads(proc.stdout)
    listed = [line.rsplit(" ", 1) for line in (lite_run["split"] / "test.txt").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(lite_run["images"] / rel) for rel, _ in listed]
    assert [r["label"] for r in rows] == [names[int(label)] for _, label in listed]
    assert len(rows) == len(fs.labels) and fs.labels.tolist() == [int(label) for _, label in listed]
    values, indices = probs.topk(3, dim=1)
    for row, vals, idx in zip(rows, values, indices, strict=True):
        assert [t["class"] for t in row["top_k"]] == [names[i] for i in idx.tolist()]
        assert [t["index"] for t in row["top_k"]] == idx.tolist()
        torch.testing.assert_close(torch.tensor([t["probability"] for t in row["top_k"]]), vals,
                                   atol=PROB_ATOL, rtol=0)


def test_csv_output_on_files_and_folders_matches_timms_own_loading(lite_run, lite_export, predict_main, capsys):
    """A run directory through the CLI vs the export folder through plain timm (model, data config, softmax)."""
    folder = lite_run["images"] / "cat"
    single = lite_run["images"] / "ship" / sorted(os.listdir(lite_run["images"] / "ship"))[0]
    assert predict_main([str(lite_run["run"]), str(folder), str(single), "--csv", "--top-k", "2",
                         "--no-progress", "--batch-size", "7"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    expected_paths = sorted(str(folder / f) for f in os.listdir(folder)) + [str(single)]
    assert [r["image"] for r in rows] == expected_paths
    assert list(rows[0]) == ["image", "label", "class_1", "probability_1", "class_2", "probability_2"]

    from PIL import Image

    model = timm.create_model(f"local-dir:{lite_export}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        probs = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in expected_paths])).softmax(1)
    names = model.pretrained_cfg["label_names"]
    values, indices = probs.topk(2, dim=1)
    for row, vals, idx in zip(rows, values, indices, strict=True):
        assert row["label"] == ""
        assert [row["class_1"], row["class_2"]] == [names[i] for i in idx.tolist()]
        got = torch.tensor([float(row["probability_1"]), float(row["probability_2"])])
        torch.testing.assert_close(got, vals, atol=PROB_ATOL, rtol=0)


def test_an_unreadable_image_is_an_error_naming_it(lite_export, predict_main, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    assert predict_main([str(lite_export), str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "cannot decode image" in err
    assert predict_main([str(lite_export), str(tmp_path / "absent.png"), "--no-progress"]) == 2
    assert str(tmp_path / "absent.png") in capsys.readouterr().err


def test_text_output_and_top_k_capped_at_k(lite_run, lite_export, predict_main, capsys):
    image = lite_run["images"] / "dog" / sorted(os.listdir(lite_run["images"] / "dog"))[0]
    assert predict_main([str(lite_export), str(image), "--top-k", "50", "--json", "--no-progress"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert sorted(t["class"] for t in row["top_k"]) == sorted(load_manifest(lite_run["split"])["class_names"])
    assert sum(t["probability"] for t in row["top_k"]) == pytest.approx(1.0, abs=1e-5)
    probabilities = [t["probability"] for t in row["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert predict_main([str(lite_export), str(image), "--top-k", "1", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(image)) and line.split()[-2] == row["top_k"][0]["class"]
