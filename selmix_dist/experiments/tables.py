"""Result tables: per ρ_u, one row per method with test metrics as mean ± sample std over seeds and the
seconds per method; then one plain-language line per compared method (SelMix objectives) on its own metric.

Records are dicts ``{"method", "seed", "rho_u", "seconds", "val": metrics, "test": metrics, ...}``; method
metadata ``{name: {"label", "start", "compared_on", "coverage_alpha"}}`` in table order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from selmix_dist.report import markdown_table

# Table columns (compute_metrics keys) and how the text names them.
METRIC_NAMES = {"mean_recall": "mean recall", "min_recall": "min recall",
                "min_head_tail_recall": "min head/tail recall", "h_mean": "H-mean", "g_mean": "G-mean",
                "min_coverage": "min coverage"}
METRICS = tuple(METRIC_NAMES)
HEADERS = tuple(name[0].upper() + name[1:] for name in METRIC_NAMES.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of per-seed numbers."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """Per-seed fractions -> "mean ± std" in percent (scale 100), e.g. [0.5, 0.6] -> "55.0 ± 7.1"."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _select(records: Sequence[dict], method: str, rho_u: float) -> list[dict]:
    return [r for r in records if r["method"] == method and r["rho_u"] == rho_u]


def summary_rows(records: Sequence[dict], methods: dict[str, dict], rho_u: float, split: str = "test") -> list[dict]:
    """Table rows for one ρ_u in ``methods`` order (methods without records are left out): label, each
    metric as "mean ± std" (%), mean seconds per seed, number of seeds."""
    rows = []
    for name, meta in methods.items():
        mine = _select(records, name, rho_u)
        if not mine:
            continue
        seconds = mean_std([r["seconds"] for r in mine])[0]
        row = {"method": meta["label"], "seeds": len(mine), "seconds": f"{seconds:.{0 if seconds >= 10 else 1}f}"}
        # coverages are ~1/K: two decimals keep them readable at K = 200
        row.update({m: format_mean_std([r[split][m] for r in mine], digits=2 if m == "min_coverage" else 1)
                    for m in METRICS})
        rows.append(row)
    return rows


def table_markdown(records: Sequence[dict], methods: dict[str, dict], rho_u: float, split: str = "test") -> str:
    return markdown_table(summary_rows(records, methods, rho_u, split), ("method", *METRICS, "seconds"),
                          headers=("Method", *HEADERS, "Time (s)"))


def _stats(records: Sequence[dict], method: str, rho_u: float, metric: str) -> tuple[float, float] | None:
    mine = _select(records, method, rho_u)
    return mean_std([r["test"][metric] for r in mine]) if mine else None


def _start_stats(records: Sequence[dict], method: str, start: str | list[str] | None, rho_u: float,
                 metric: str) -> tuple[float, float] | None:
    """Test `metric` of the method's start head over seeds; for a start chosen among several methods, each
    seed's chosen one (the record's ``info["start"]``)."""
    if not start:
        return None
    if isinstance(start, str):
        return _stats(records, start, rho_u, metric)
    values = []
    for r in _select(records, method, rho_u):
        chosen = [s for s in _select(records, r["info"]["start"], rho_u) if s["seed"] == r["seed"]]
        if not chosen:
            return None
        values.append(chosen[0]["test"][metric])
    return mean_std(values) if values else None


def _start_label(methods: dict[str, dict], start: str | list[str]) -> str:
    if isinstance(start, str):
        return methods[start]["label"]
    return "the better on validation of " + " / ".join(methods.get(s, {}).get("label", s) for s in start)


def comparison_lines(records: Sequence[dict], methods: dict[str, dict], rho_u: float, num_classes: int) -> list[str]:
    """One sentence per compared method: its own test metric against its start head and against the best
    method that is not compared and not SelMix-based (a baseline), with whether the gap exceeds one std; for a
    per-class coverage constraint, whether test min coverage met α/K on average. Means over seeds, in points (%)."""
    baselines = [n for n, m in methods.items()
                 if m["compared_on"] is None and not selmix_based(methods, n) and _select(records, n, rho_u)]
    lines = []
    for name, meta in methods.items():
        metric = meta["compared_on"]
        mine = _stats(records, name, rho_u, metric) if metric else None
        if mine is None:
            continue
        what = METRIC_NAMES.get(metric, metric)
        text = f"- ρ_u={rho_u:g}, {meta['label']}: test {what} {100 * mine[0]:.1f} ± {100 * mine[1]:.1f}"
        start = _start_stats(records, name, meta.get("start"), rho_u, metric)
        if start is not None:
            text += (f", {100 * (mine[0] - start[0]):+.1f} points over its start "
                     f"({_start_label(methods, meta['start'])}, {100 * start[0]:.1f})")
        others = {b: _stats(records, b, rho_u, metric) for b in baselines}
        if others:
            best = max(others, key=lambda b: others[b][0])
            gap, spread = mine[0] - others[best][0], max(mine[1], others[best][1])
            side = "above" if gap >= 0 else "below"
            text += (f"; {100 * abs(gap):.1f} points {side} the best baseline ({methods[best]['label']}, "
                     f"{100 * others[best][0]:.1f} ± {100 * others[best][1]:.1f})")
            if len(_select(records, name, rho_u)) > 1:   # one seed has no spread to compare with
                text += ", within one std" if abs(gap) <= spread else ", more than one std"
        alpha = meta.get("coverage_alpha")
        if alpha is not None:
            cov, target = _stats(records, name, rho_u, "min_coverage")[0], alpha / num_classes
            text += (f"; min coverage {100 * cov:.2f} against the constraint ≥ {100 * target:.2f}: "
                     + ("met" if cov >= target else "not met") + " on average")
        lines.append(text + ".")
    return lines


# The metrics on which SelMix-based rows must lead every other row (docs/results.md, "Where SelMix leads").
LEAD_METRICS = ("min_recall", "min_head_tail_recall", "h_mean", "g_mean")


def selmix_based(methods: dict[str, dict], name: str) -> bool:
    """A SelMix run (a trainer method compared on its objective, not uniform mixup) or a method that starts,
    directly or through its starts, from one (e.g. SelMix + plug-in)."""
    meta = methods[name]
    if meta.get("kind") == "trainer" and meta["compared_on"] is not None:
        return True
    start = meta.get("start") or []
    return any(selmix_based(methods, s) for s in ([start] if isinstance(start, str) else start) if s in methods)


def lead_lines(records: Sequence[dict], methods: dict[str, dict], rho_u: float) -> list[str]:
    """Per LEAD_METRICS metric: the best SelMix-based row against the best other row (test means over seeds)."""
    present = [n for n in methods if _select(records, n, rho_u)]
    lines = []
    for metric in LEAD_METRICS:
        means = {n: _stats(records, n, rho_u, metric)[0] for n in present}
        ours = [n for n in present if selmix_based(methods, n)]
        theirs = [n for n in present if not selmix_based(methods, n)]
        if not ours or not theirs:
            continue
        a, b = max(ours, key=means.get), max(theirs, key=means.get)
        gap = 100 * (means[a] - means[b])
        lines.append(f"- ρ_u={rho_u:g}, {METRIC_NAMES[metric]}: best SelMix-based row {methods[a]['label']} "
                     f"{100 * means[a]:.1f}, best other row {methods[b]['label']} {100 * means[b]:.1f}: "
                     f"{gap:+.1f} points" + (" (leads by ≥ 1 point)." if gap >= 1.0 else "."))
    return lines


def results_markdown(result: dict[str, Any]) -> str:
    """The printed report: per ρ_u a table (test, mean ± std over seeds, %) and the comparison lines; timings."""
    exp, records, methods = result["experiment"], result["records"], result["methods"]
    k = len(result["class_names"])
    split = exp["split"]
    parts = []
    for rho_u in result["rho_u"]:
        seeds = sorted({r["seed"] for r in records if r["rho_u"] == rho_u})
        parts.append(f"{exp['name']} (K={k}, N1={split['n1']}, ρ_l={split['rho_l']:g}, M1={split['m1']}, "
                     f"ρ_u={rho_u:g}, {exp['features']['tag']} at {exp['features']['image_size']} px): test "
                     f"metrics in %, mean ± std (ddof=1) over seeds {seeds}; time: seconds per seed\n\n"
                     + table_markdown(records, methods, rho_u))
        lines = comparison_lines(records, methods, rho_u, k) + lead_lines(records, methods, rho_u)
        if lines:
            parts.append("\n".join(lines) + "\n")
    t = result["timings"]
    parts.append(f"time: features {t['features_s']:.0f} s (extraction {t['extract_s']:.0f} s), methods "
                 f"{t['methods_s']:.0f} s for {t['computed']} computed results ({t['stored']} read from the "
                 f"store), total {t['total_s']:.0f} s\n")
    return "\n".join(parts)
