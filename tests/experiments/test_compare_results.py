"""tools/compare_results.py: two runs of an experiment compared method by method on hand-made records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("tools_compare_results", REPO / "tools" / "compare_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(values: dict[int, float], starts: dict[int, str] | None = None) -> dict:
    methods = {"base": {"compared_on": None}, "sel": {"compared_on": "min_recall"}}
    records = [{"method": "sel", "seed": seed, "rho_u": 100.0, "val": {"min_recall": v}, "test": {"min_recall": 0.0},
                "info": {"start": starts[seed]} if starts else {}} for seed, v in values.items()]
    records.append({"method": "base", "seed": 0, "rho_u": 100.0, "val": {"min_recall": 0.9}, "info": {}})
    return {"methods": methods, "rho_u": [100.0, 1.0], "records": records}


def test_compare_on_the_seeds_both_runs_have(tmp_path, capsys):
    tool = _tool()
    a = _results({0: 0.50, 1: 0.60, 2: 0.99}, starts={0: "la", 1: "la", 2: "fixmatch_la"})
    b = _results({0: 0.55, 1: 0.75})                     # seed 2 missing: A's seed 2 is left out too
    (row,) = tool.compare(a, b, "val")
    # A: 50, 60 → 55.0 ± 7.1; B: 55, 75 → 65.0 ± 14.1; B − A = +10.0; only 'sel' has a compared metric
    assert row == {"method": "sel", "rho_u": "100", "metric": "min_recall", "a": "55.0 ± 7.1", "b": "65.0 ± 14.1",
                   "diff": "+10.0", "a_starts": "la ×2"}
    assert tool.compare(a, b, "val", ("base*",)) == []
    for name, run in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    assert tool.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "| sel | 100 | min_recall | 55.0 ± 7.1 | 65.0 ± 14.1 | +10.0 | la ×2 |" in capsys.readouterr().out
