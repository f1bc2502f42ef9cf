"""Config values the data cannot support are refused before any work; run.steps=0 has one meaning (issue 19).

Before the fix optim.batch_size=100000 on 240 labeled rows was accepted and ran at 2 s a step (every row drawn
about 417 times per step, with replacement)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from synthetic_run import synthetic_data  # noqa: E402
from test_containment import cache as cache  # noqa: E402,F401 - the module fixture, shared
from test_containment import one_error_line, train  # noqa: E402

from selmix_dist.config import load_config  # noqa: E402
from selmix_dist.data.synthetic import long_tailed_class_counts  # noqa: E402
from selmix_dist.train.build import check_data  # noqa: E402

# synthetic_data(): 6 classes, 60 labeled rows in the largest, imbalance 10
LABELED_ROWS = int(long_tailed_class_counts(60, 10, 6).sum())


def test_a_batch_larger_than_the_labeled_split_is_refused_naming_both_numbers(cache, tmp_path):
    line = one_error_line(train(cache, tmp_path / "run", "optim.batch_size=100000"))
    assert "config key 'optim.batch_size' (100000 pairs per step and rank)" in line, line
    assert f"exceeds the {LABELED_ROWS} rows of the labeled split 'labeled'" in line
    assert f"about {100000 / LABELED_ROWS:.0f} times" in line and f"use at most {LABELED_ROWS}" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_batch_limit_is_the_number_of_labeled_rows(tmp_path):
    data = synthetic_data()
    assert len(data.labeled) == LABELED_ROWS
    check_data(load_config(None, [f"optim.batch_size={LABELED_ROWS}", "selmix.setting=supervised"]), data)
    with pytest.raises(ValueError, match=f"\\({LABELED_ROWS + 1} pairs per step and rank\\) exceeds the "
                                         f"{LABELED_ROWS} rows"):
        check_data(load_config(None, [f"optim.batch_size={LABELED_ROWS + 1}", "selmix.setting=supervised"]), data)


def test_zero_steps_evaluates_the_start_head_as_a_complete_run_that_can_be_extended(cache, tmp_path):
    """run.steps=0 means: fit (or read) the start head, evaluate it on validation and test, checkpoint it as a
    complete run at step 0 (report included). No SGD step is taken; run.extend_steps continues from it."""
    run = tmp_path / "run"
    proc = train(cache, run, "run.steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["split"]) for h in history] == [(0, "val"), (0, "test")]
    start = torch.load(run / "init_head.pt", weights_only=True)
    for name in ("best.pt", "step_00000000.pt"):
        state = torch.load(run / "checkpoints" / name, weights_only=True)
        assert state["step"] == 0 and all(torch.equal(state["head"][k], start[k]) for k in start), name
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["final_step"] == 0
    assert (run / "report.md").is_file()
    extended = train(cache, run, "run.steps=20", "run.extend_steps=true")
    assert extended.returncode == 0, extended.stderr[-3000:]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["split"]) for h in history[:2]] == [(0, "val"), (0, "test")]
    assert history[2:] and all(h["step"] > 0 for h in history[2:])
