"""tools/bench_coverage_floor.py: its JSON rows agree with a count made here from the same synthetic logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_the_benchmark_reports_the_floor_it_reached():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_coverage_floor.py"), "--classes", "12", "30",
                           "--per-class", "20", "--repeats", "1", "--json"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    sys.path.insert(0, str(REPO / "tools"))
    from bench_coverage_floor import synthetic_logits

    for row in rows:
        logits = synthetic_logits(row["K"], 20, 3.0)
        need = math.ceil(0.95 * 20)
        short = int((torch.bincount(logits.argmax(1), minlength=row["K"]) < need).sum())
        assert (row["V"], row["need"], row["short_before"]) == (20 * row["K"], need, short)
        assert short > 0 and row["raised"] >= short and row["met"] and row["fewest_after"] >= need
