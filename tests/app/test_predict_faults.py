"""tools/predict.py on damaged input: a truncated export is one error line; a bad image among good ones is
reported and skipped while the others are predicted (issue 19; both failed before the fix: a SafetensorError
traceback, and a whole call stopped at the first undecodable image)."""

from __future__ import annotations

import json
import os
import shutil

import pytest


@pytest.fixture(scope="module")
def predict_main(tool):
    return tool("predict").main


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_truncated_export_is_one_error_line_naming_the_weights(lite_export, lite_run, predict_main, tmp_path,
                                                                 capsys):
    broken = tmp_path / "classifier"
    shutil.copytree(lite_export, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    image = lite_run["images"] / "cat" / sorted(os.listdir(lite_run["images"] / "cat"))[0]
    assert predict_main([str(broken), str(image), "--no-progress"]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"error: export {broken}: {weights} cannot be read (") and "truncated or corrupted" in line
    assert "its sha256 is not the one selmix_export.json recorded" in line and "Traceback" not in err


def test_a_corrupt_image_is_reported_and_the_others_are_predicted(lite_export, lite_run, predict_main, tmp_path,
                                                                  capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    cats = lite_run["images"] / "cat"
    for name in sorted(os.listdir(cats))[:3]:
        shutil.copy(cats / name, folder / name)
    good = sorted(str(p) for p in folder.iterdir())
    assert predict_main([str(lite_export), *good, "--json", "--no-progress"]) == 0
    expected = json.loads(capsys.readouterr().out)  # the good images alone: the reference
    bad = folder / "0000_broken.jpg"  # sorts first: the bad file comes before every good one
    bad.write_bytes(b"not a JPEG at all")
    assert predict_main([str(lite_export), str(folder), "--json", "--no-progress", "--batch-size", "2"]) == 2
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [(r["image"], [t["class"] for t in r["top_k"]]) for r in rows] == \
        [(r["image"], [t["class"] for t in r["top_k"]]) for r in expected]
    for row, reference in zip(rows, expected, strict=True):  # other batches: float32 rounding only
        assert [t["probability"] for t in row["top_k"]] == pytest.approx(
            [t["probability"] for t in reference["top_k"]], abs=1e-5)
    lines = error_lines(err)
    assert lines[0].startswith(f"error: cannot decode image {bad}: ")
    assert lines[1:] == ["error: 1 of 4 images could not be read (listed above); the other 3 were predicted"]


def test_only_bad_images_give_an_empty_result_and_exit_2(lite_export, predict_main, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    assert predict_main([str(lite_export), str(bad), "--csv", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == ["image,label,class_1,probability_1,class_2,probability_2,class_3,probability_3,"
                                "class_4,probability_4,class_5,probability_5"]
    assert error_lines(err)[-1] == "error: 1 of 1 images could not be read (listed above); the other 0 were predicted"
