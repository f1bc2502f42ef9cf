"""selmix_dist.experiments.tables: mean ± std and table rows against hand-computed values; the comparison
sentences' numbers and verdicts on a hand-made set of records."""

from __future__ import annotations

import math

import pytest

from selmix_dist.experiments.tables import METRICS, comparison_lines, format_mean_std, mean_std, summary_rows


def test_mean_std_hand_computed():
    # mean 0.3; deviations −0.2, −0.1, 0.3 → squares sum 0.14; ddof = 1 → variance 0.07
    mean, std = mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(math.sqrt(0.07))
    assert mean_std([0.8]) == (pytest.approx(0.8), 0.0)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize(("values", "text"), [
    ([0.5, 0.6], "55.0 ± 7.1"),          # std = sqrt(2 · 0.05² / 1) = 0.0707
    ([0.1, 0.2, 0.6], "30.0 ± 26.5"),    # sqrt(0.07) = 0.2646
    ([0.8], "80.0 ± 0.0"),
    ([0.12345, 0.12345], "12.3 ± 0.0"),
])
def test_format_mean_std(values, text):
    assert format_mean_std(values) == text


def record(method, seed, rho_u, seconds=1.0, **test):
    metrics = dict.fromkeys(METRICS, 0.5)
    metrics.update(test)
    return {"method": method, "seed": seed, "rho_u": rho_u, "seconds": seconds, "test": metrics,
            "val": dict.fromkeys(METRICS, 0.9)}


META = {
    "base": {"label": "Base", "start": None, "compared_on": None, "coverage_alpha": None},
    "start": {"label": "Start", "start": None, "compared_on": None, "coverage_alpha": None},
    "sel": {"label": "Sel", "start": "start", "compared_on": "min_recall", "coverage_alpha": 0.95},
    "absent": {"label": "Absent", "start": None, "compared_on": None, "coverage_alpha": None},
}


def records():
    out = []
    for seed, (sel, cov) in enumerate(((0.5, 0.09), (0.6, 0.09), (0.7, 0.10))):
        out.append(record("sel", seed, 100.0, seconds=10.0 + seed, min_recall=sel, min_coverage=cov))
        out.append(record("start", seed, 100.0, min_recall=0.2))
        out.append(record("base", seed, 100.0, seconds=0.25, min_recall=0.65))
        out.append(record("base", seed, 1.0, min_recall=0.1))
    return out


def test_summary_rows_in_method_order():
    rows = summary_rows(records(), META, 100.0)
    assert [r["method"] for r in rows] == ["Base", "Start", "Sel"]     # META order; methods without records left out
    assert rows[2]["min_recall"] == "60.0 ± 10.0" and rows[2]["seeds"] == 3
    assert rows[2]["seconds"] == "11" and rows[0]["seconds"] == "0.2"  # mean of 10, 11, 12; of 0.25
    assert rows[0]["min_recall"] == "65.0 ± 0.0"
    assert summary_rows(records(), META, 1.0)[0]["min_recall"] == "10.0 ± 0.0"
    assert summary_rows(records(), META, 100.0, split="val")[0]["h_mean"] == "90.0 ± 0.0"


def test_comparison_line_numbers_and_verdicts():
    (line,) = comparison_lines(records(), META, 100.0, num_classes=10)
    assert line.startswith("- ρ_u=100, Sel: test min recall 60.0 ± 10.0")
    assert "+40.0 points over its start (Start, 20.0)" in line
    # best baseline Base 65.0: 5.0 below, inside Sel's std of 10.0
    assert "5.0 points below the best baseline (Base, 65.0 ± 0.0), within one std" in line
    # min coverage mean (0.09 + 0.09 + 0.10) / 3 = 9.33 % < α/K = 9.50 %
    assert "min coverage 9.33 against the constraint ≥ 9.50: not met on average" in line
    better = [r | {"test": r["test"] | {"min_recall": 0.9}} if r["method"] == "sel" else r for r in records()]
    (line,) = comparison_lines(better, META, 100.0, num_classes=10)
    assert "25.0 points above the best baseline (Base, 65.0 ± 0.0), more than one std" in line
    assert comparison_lines(records(), META, 1.0, num_classes=10) == []   # no compared method at ρ_u = 1
    (line,) = comparison_lines([r for r in records() if r["seed"] == 0], META, 100.0, num_classes=10)
    assert line.endswith("(Base, 65.0 ± 0.0); min coverage 9.00 against the constraint ≥ 9.50: not met on average.")


def test_a_start_chosen_per_seed_is_compared_seed_by_seed():
    """start: [start, base] — each seed's record names the chosen one; the line averages those heads' metric:
    seeds 0, 1 chose 'start' (0.2), seed 2 'base' (0.65) → (0.2 + 0.2 + 0.65) / 3 = 35.0; Sel 60.0 → +25.0."""
    meta = {**META, "sel": META["sel"] | {"start": ["start", "base"]}}
    recs = [r | {"info": {"start": "base" if r["seed"] == 2 else "start"}} if r["method"] == "sel" else r
            for r in records()]
    (line,) = comparison_lines(recs, meta, 100.0, num_classes=10)
    assert "+25.0 points over its start (the better on validation of Start / Base, 35.0)" in line


def test_lead_lines_compare_the_best_selmix_based_row_with_the_best_other_row():
    from selmix_dist.experiments.tables import lead_lines, selmix_based

    methods = {
        "la": {"label": "LA", "kind": "fit_head", "start": None, "compared_on": None},
        "plugin_la": {"label": "Plug-in on LA", "kind": "plugin", "start": "la", "compared_on": None},
        "mixup": {"label": "Mixup", "kind": "trainer", "start": "la", "compared_on": None},
        "selmix": {"label": "SelMix", "kind": "trainer", "start": "la", "compared_on": "min_recall"},
        "selmix_plugin": {"label": "SelMix + plug-in", "kind": "plugin", "start": ["selmix", "la"],
                          "compared_on": None},
    }
    assert [n for n in methods if selmix_based(methods, n)] == ["selmix", "selmix_plugin"]
    records = [record("la", s, 1.0, min_recall=0.10) for s in (0, 1)]
    records += [record("plugin_la", 0, 1.0, min_recall=0.20), record("plugin_la", 1, 1.0, min_recall=0.22)]
    records += [record("mixup", s, 1.0, min_recall=0.30, h_mean=0.6) for s in (0, 1)]
    records += [record("selmix", s, 1.0, min_recall=0.25) for s in (0, 1)]
    records += [record("selmix_plugin", 0, 1.0, min_recall=0.33), record("selmix_plugin", 1, 1.0, min_recall=0.35)]
    lines = lead_lines(records, methods, 1.0)
    assert lines[0] == ("- ρ_u=1, min recall: best SelMix-based row SelMix + plug-in 34.0, best other row Mixup "
                        "30.0: +4.0 points (leads by ≥ 1 point).")
    # H-mean: mixup 60 against 50 for every SelMix-based row
    assert any(line.startswith("- ρ_u=1, H-mean:") and "-10.0 points." in line for line in lines)
    # SelMix's own sentence compares it with the best baseline, never with a SelMix-based row
    (selmix_line,) = comparison_lines(records, methods, 1.0, num_classes=10)
    assert "5.0 points below the best baseline (Mixup, 30.0 ± 0.0)" in selmix_line
