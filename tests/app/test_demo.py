"""`make demo`'s job end to end: real digits, real Lite0 weights, semi-supervised SelMix for min recall."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_raises_min_recall_over_starting_head(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--out", str(tmp_path),
                           "log.progress=false"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "selmix_min_recall"
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    for split in ("val", "test"):
        values = [h["metrics"]["min_recall"] for h in history if h["split"] == split]
        assert values[-1] > values[0], (split, values)
    split = json.loads((tmp_path / "split" / "split.json").read_text())
    labeled = split["counts"]["labeled"]
    assert max(labeled) / min(labeled) >= 10  # long-tailed as promised
    assert "test min recall" in proc.stdout and "TensorBoard" in proc.stdout
    assert "P has stayed on" not in proc.stderr  # the quickstart runs without the library's collapse warning
