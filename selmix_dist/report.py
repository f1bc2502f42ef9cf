"""Evaluation report of one training run directory.

Run directory (written by the trainer):

    config.yaml               the resolved configuration
    history.jsonl             one JSON object per evaluation:
                              {"step": int, "split": "val"|"test", "metrics": {name: float},
                               "per_class_recall": [K floats]}
    distribution_first.pt     torch.save({"step": int, "P": float32[K, K], "G": float32[K, K]}), first refresh
    distribution_last.pt      the same at the last refresh
    meta.json                 {"class_names": [...], "train_class_counts": [K ints], "objective": str,
                               "target_metric": str, "num_classes": K}
    tb/, checkpoints/         (not read here)

`write_report(run_dir)` writes report.json, report.csv, report.md and PNG plots into the run directory.
Columns: *first* = first evaluation of the split ("before"), *last* = final one ("after"), *best* = the step
with the highest validation target metric (ties -> earliest step; the same rule as the trainer's best.pt).
The best step is chosen on validation only. Test metrics are reported at that step when the test set was
evaluated there; otherwise the "best" test column uses the best validation step among the steps that have a
test evaluation (still selected by validation only), and the report says which step that is.
Plots of K x K matrices and per-class curves sort classes by training frequency (descending) and aggregate
them into at most MAX_BINS bins, so K = 8142 stays cheap.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from selmix_dist import atomic
from selmix_dist.core.metrics import METRIC_NAMES

SPLITS = ("val", "test")
RECORD_SPLITS = (*SPLITS, "test_best")  # test_best: the best head on test at the end, its step in head_step
MAX_BINS = 200
REQUIRED_FILES = ("config.yaml", "meta.json", "history.jsonl", "distribution_first.pt",
                  "distribution_last.pt")
META_FIELDS = ("class_names", "train_class_counts", "objective", "target_metric", "num_classes")
PLOTS = ("per_class_recall.png", "distribution.png", "target_metric.png")
OUTPUTS = ("report.json", "report.csv", "report.md", *PLOTS)  # what write_report writes


# ----------------------------------------------------------------------------------------------- tables
def _cell(value: Any, float_format: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return float_format.format(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                   float_format: str = "{:.4f}") -> str:
    """A GitHub markdown table: one row per dict, one column per key in `columns` (header = the key, or
    `headers`). Floats use `float_format`; missing / None / NaN values print as "—"; "|" is escaped."""
    headers = list(columns) if headers is None else list(headers)
    if len(headers) != len(columns):
        raise ValueError(f"markdown_table: {len(columns)} columns but {len(headers)} headers")
    lines = ["| " + " | ".join(_cell(h, float_format) for h in headers) + " |",
             "|" + "|".join(["---"] * len(columns)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), float_format) for c in columns) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- loading
def _require(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"incomplete run directory: {path} is missing")
    return path


def load_meta(run_dir: Path) -> dict:
    path = _require(run_dir, "meta.json")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    k = meta["num_classes"]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{path}: num_classes must be a positive int, got {k!r}")
    for field in ("class_names", "train_class_counts"):
        if len(meta[field]) != k:
            raise ValueError(f"{path}: {field} has {len(meta[field])} entries, num_classes = {k}")
    return meta


def load_history(run_dir: Path, num_classes: int) -> list[dict]:
    """Records of history.jsonl, validated; a repeated (step, split) keeps the last record."""
    path = _require(run_dir, "history.jsonl")
    records: dict[tuple[int, str], dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        for field in ("step", "split", "metrics", "per_class_recall"):
            if field not in rec:
                raise ValueError(f"{where}: missing field '{field}'")
        valid = isinstance(rec["step"], int) and rec["split"] in RECORD_SPLITS and isinstance(rec["metrics"], dict)
        if not valid:
            raise ValueError(f"{where}: need an int 'step', 'split' in {RECORD_SPLITS} and a 'metrics' object")
        if len(rec["per_class_recall"]) != num_classes:
            raise ValueError(f"{where}: per_class_recall has {len(rec['per_class_recall'])} entries, "
                             f"num_classes = {num_classes}")
        records[(rec["step"], rec["split"])] = rec
    return sorted(records.values(), key=lambda r: (r["step"], RECORD_SPLITS.index(r["split"])))


def load_distribution(run_dir: Path, name: str, num_classes: int) -> dict:
    path = _require(run_dir, name)
    snap = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(snap, dict) or "P" not in snap or "step" not in snap:
        raise ValueError(f"{path}: expected a dict with 'step', 'P' and 'G'")
    if tuple(snap["P"].shape) != (num_classes, num_classes):
        raise ValueError(f"{path}: P has shape {tuple(snap['P'].shape)}, expected "
                         f"({num_classes}, {num_classes})")
    return snap


# ----------------------------------------------------------------------------------------------- summary
def head_test_records(history: list[dict]) -> dict[int, dict]:
    """{head step: its test record}: 'test' records at their step, and the trainer's end-of-run evaluation
    of the best head (split 'test_best', the head's step in 'head_step'), filed under that step."""
    out = {r["step"]: r for r in history if r["split"] == "test"}
    out.update({r["head_step"]: {**r, "step": r["head_step"]} for r in history if r["split"] == "test_best"})
    return out


def summarise(history: list[dict], target_metric: str) -> dict:
    """first / last / best evaluations per split (see the module docstring for the best-step rule)."""
    by_split = {s: [r for r in history if r["split"] == s] for s in SPLITS}
    val = by_split["val"]
    if not val:
        raise ValueError("history.jsonl has no validation ('val') record; the best step needs one")
    missing = [r["step"] for r in val if target_metric not in r["metrics"]]
    if missing:
        raise ValueError(f"history.jsonl: target metric '{target_metric}' missing at val step(s) "
                         f"{missing[:5]}")

    def best_of(records: list[dict]) -> dict:
        # max over the target; on ties the earliest step (records are sorted by step).
        return max(records, key=lambda r: (r["metrics"][target_metric], -r["step"]))

    best_val = best_of(val)
    test_by_step = head_test_records(history)
    tested = [r for r in val if r["step"] in test_by_step]
    best_tested = best_of(tested) if tested else None
    out: dict[str, Any] = {
        "target_metric": target_metric,
        "best_step": best_val["step"],
        "best_test_step": best_tested["step"] if best_tested else None,
        "splits": {},
    }
    for split, records in by_split.items():
        if not records:
            out["splits"][split] = None
            continue
        best = best_val if split == "val" else (test_by_step[best_tested["step"]] if best_tested else None)
        out["splits"][split] = {name: _entry(rec) for name, rec in
                                (("first", records[0]), ("last", records[-1]), ("best", best))}
    return out


def _entry(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {key: record[key] for key in ("step", "metrics", "per_class_recall")}


def _metric_order(history: list[dict]) -> list[str]:
    seen = {name for r in history for name in r["metrics"]}
    return [n for n in METRIC_NAMES if n in seen] + sorted(seen.difference(METRIC_NAMES))


COLUMNS = tuple(f"{split}_{which}" for split in SPLITS for which in ("first", "last", "best"))


def metric_rows(summary: dict, names: Sequence[str]) -> list[dict]:
    """One dict per metric: {"metric": name, "val_first": ..., ..., "test_best": ...} (None when absent)."""
    rows = []
    for name in names:
        row: dict[str, Any] = {"metric": name}
        for split in SPLITS:
            for which in ("first", "last", "best"):
                entry = (summary["splits"][split] or {}).get(which)
                row[f"{split}_{which}"] = entry["metrics"].get(name) if entry else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- plots
def frequency_bins(train_counts: Sequence[int], max_bins: int = MAX_BINS) -> tuple[np.ndarray, int]:
    """Classes sorted by training count (descending, stable) split into <= max_bins contiguous bins of
    near-equal size. Returns (bin index of each class int64[K], number of bins)."""
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    nbins = min(len(counts), max_bins)
    bin_of = np.empty(len(counts), dtype=np.int64)
    for b, members in enumerate(np.array_split(order, nbins)):
        bin_of[members] = b
    return bin_of, nbins


def bin_vector(values: Sequence[float], bin_of: np.ndarray, nbins: int) -> np.ndarray:
    """Mean of `values` [K] within each bin -> [nbins]."""
    sums = np.bincount(bin_of, weights=np.asarray(values, dtype=np.float64), minlength=nbins)
    return sums / np.bincount(bin_of, minlength=nbins)


def bin_matrix(matrix: torch.Tensor, bin_of: np.ndarray, nbins: int) -> np.ndarray:
    """Block sums of a [K, K] matrix over the bins -> float64 [nbins, nbins] (rows and columns alike)."""
    idx = torch.from_numpy(bin_of)
    matrix = matrix.to(torch.float64)
    rows = torch.zeros(nbins, matrix.shape[1], dtype=torch.float64).index_add_(0, idx, matrix)
    return torch.zeros(nbins, nbins, dtype=torch.float64).index_add_(1, idx, rows).numpy()


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_per_class(path: Path, summary: dict, meta: dict) -> None:
    import matplotlib.pyplot as plt

    bin_of, nbins = frequency_bins(meta["train_class_counts"])
    splits = [s for s in SPLITS if summary["splits"][s]]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.2), squeeze=False)
    x = np.arange(nbins)
    freq = bin_vector(meta["train_class_counts"], bin_of, nbins)
    for ax, split in zip(axes[0], splits, strict=True):
        s = summary["splits"][split]
        twin = ax.twinx()
        twin.bar(x, freq, color="0.85", width=1.0, zorder=0)
        twin.set_yscale("log")
        twin.set_ylabel("train samples per class (bin mean)")
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        for which, style in (("first", "C0o-"), ("last", "C3s-")):
            ax.plot(x, bin_vector(s[which]["per_class_recall"], bin_of, nbins), style, ms=3, lw=1,
                    label=f"{'before' if which == 'first' else 'after'} (step {s[which]['step']})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"classes by train frequency, {nbins} bins of ~{len(bin_of) / nbins:.3g}")
        ax.set_ylabel("recall (bin mean)")
        ax.set_title(f"{split}: per-class recall")
        ax.legend(loc="lower left")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_distributions(path: Path, first: dict, last: dict, meta: dict) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    bin_of, nbins = frequency_bins(meta["train_class_counts"])
    # Mean mass per class pair within a block: bins differ in size by one class, block sums would show bands.
    sizes = np.bincount(bin_of, minlength=nbins).astype(np.float64)
    blocks = [bin_matrix(snap["P"], bin_of, nbins) / np.outer(sizes, sizes) for snap in (first, last)]
    positive = np.concatenate([b[b > 0] for b in blocks])
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(positive.min()) if positive.size else 1e-12, vmax * 1e-8)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, snap, block, name in zip(axes, (first, last), blocks, ("first", "last"), strict=True):
        im = ax.imshow(np.clip(block, vmin, None), norm=LogNorm(vmin=vmin, vmax=vmax), cmap="viridis",
                       interpolation="nearest")
        ax.set_title(f"P at {name} refresh (step {snap['step']})")
        ax.set_xlabel("partner class j (bins by train frequency)")
        ax.set_ylabel("label class i (bins by train frequency)")
    fig.colorbar(im, ax=axes, shrink=0.85, label="P per class pair (bin mean)")
    _save_figure(fig, path)


def _plot_target(path: Path, history: list[dict], target: str, best_step: int) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for split, style in (("val", "C0o-"), ("test", "C3s-")):
        pts = [(r["step"], r["metrics"][target]) for r in history
               if r["split"] == split and target in r["metrics"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, ms=3, lw=1, label=split)
    ax.axvline(best_step, color="0.5", ls="--", lw=1, label=f"best val step {best_step}")
    ax.set_xlabel("step")
    ax.set_ylabel(target)
    ax.set_title(f"{target} over training")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


# ------------------------------------------------------------------------------------------- gain forecast
def load_forecast(run_dir: Path) -> list[dict]:
    """Records of forecast.jsonl ({"step", "from_step", "predicted", "realised"}); [] for runs before it."""
    path = run_dir / "forecast.jsonl"
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        rec = json.loads(line)
        if not all(isinstance(rec.get(key), (int, float)) for key in ("step", "from_step", "predicted", "realised")):
            raise ValueError(f"{path}:{n}: need numbers 'step', 'from_step', 'predicted' and 'realised'")
        records.append(rec)
    return records


def forecast_summary(records: list[dict]) -> dict | None:
    """Whether the gain predicts (core.forecast): over the refresh intervals, the sums of the predicted and the
    realised change of ψ, the fraction with the same sign, and their Pearson correlation (None below 3
    intervals or without spread). None without intervals."""
    if not records:
        return None
    p = np.array([r["predicted"] for r in records], dtype=np.float64)
    q = np.array([r["realised"] for r in records], dtype=np.float64)
    corr = None
    if len(p) >= 3 and p.std() > 0 and q.std() > 0:
        corr = float(np.corrcoef(p, q)[0, 1])
    return {"intervals": len(p), "predicted_sum": float(p.sum()), "realised_sum": float(q.sum()),
            "same_sign": float(np.mean(np.sign(p) == np.sign(q))), "correlation": corr}


def _forecast_markdown(records: list[dict], summary: dict | None) -> list[str]:
    if summary is None:
        return []
    corr = "n/a" if summary["correlation"] is None else f"{summary['correlation']:.2f}"
    lines = ["", "## Does the gain predict?", "",
             f"Over {summary['intervals']} refresh intervals the gain predicted a total change of ψ of "
             f"{summary['predicted_sum']:+.4g} and validation ψ changed by {summary['realised_sum']:+.4g} "
             f"(same sign in {100 * summary['same_sign']:.0f} % of the intervals, correlation {corr}). "
             "Predicted: Σ P∘G times the learning rates summed to the next refresh; realised: ψ at the next "
             "refresh with the same multipliers (docs/method.md §4.4).", ""]
    shown = records if len(records) <= 10 else records[:5] + records[-5:]
    rows = [{"interval": f"{r['from_step']}→{r['step']}", "predicted": r["predicted"], "realised": r["realised"]}
            for r in shown]
    return lines + [markdown_table(rows, ["interval", "predicted", "realised"], float_format="{:.4g}")]


# ----------------------------------------------------------------------------------------------- writing
def _markdown(run_dir: Path, meta: dict, summary: dict, rows: list[dict], forecast: list[str]) -> str:
    target = meta["target_metric"]
    headers = ["metric"] + [f"{split} {which}" for split in SPLITS for which in ("first", "last", "best")]
    steps = {split: {w: (e["step"] if e else None) for w, e in (summary["splits"][split] or {}).items()}
             for split in SPLITS}
    lines = [f"# Run report: {run_dir.name}", "",
             f"- objective: `{meta['objective']}`, target metric: `{target}`, classes: {meta['num_classes']}",
             f"- best step (max validation `{target}`, ties → earliest): {summary['best_step']}"]
    if summary["splits"]["test"]:
        if summary["best_test_step"] is None:
            lines.append("- no step has both a validation and a test evaluation: test best is empty")
        elif summary["best_test_step"] != summary["best_step"]:
            lines.append(f"- the test set was not evaluated at step {summary['best_step']}; test best is at "
                         f"step {summary['best_test_step']}, the best validation step among the tested steps")
    for split in SPLITS:
        if steps[split]:
            got = steps[split]
            lines.append(f"- {split} steps: first {got.get('first')}, last {got.get('last')}, "
                         f"best {got.get('best')}")
    lines += ["", "first = before fine-tuning (first evaluation), last = after (final evaluation).", "",
              markdown_table(rows, ["metric", *COLUMNS], headers)]
    lines += [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(lines + forecast) + "\n"


def write_report(run_dir: str | Path) -> dict:
    """Read the run directory, write report.json / report.csv / report.md and the PNG plots into it and
    return the report dictionary. FileNotFoundError names a missing file; ValueError a malformed one."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    for name in REQUIRED_FILES:
        _require(run_dir, name)
    config = yaml.safe_load(_require(run_dir, "config.yaml").read_text())
    meta = load_meta(run_dir)
    k = meta["num_classes"]
    history = load_history(run_dir, k)
    first, last = (load_distribution(run_dir, f"distribution_{w}.pt", k) for w in ("first", "last"))
    summary = summarise(history, meta["target_metric"])
    rows = metric_rows(summary, _metric_order(history))
    forecast = load_forecast(run_dir)

    _plot_per_class(run_dir / PLOTS[0], summary, meta)
    _plot_distributions(run_dir / PLOTS[1], first, last, meta)
    _plot_target(run_dir / PLOTS[2], history, meta["target_metric"], summary["best_step"])

    report = {"run_dir": str(run_dir), "objective": meta["objective"], "num_classes": k,
              "config": config,
              "distribution_steps": {"first": int(first["step"]), "last": int(last["step"])},
              **summary, "gain_forecast": forecast_summary(forecast), "plots": list(PLOTS)}
    atomic.write_text(run_dir / "report.json", json.dumps(report, indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["metric", *COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: ("" if value is None else value) for key, value in row.items()} for row in rows)
    atomic.write_text(run_dir / "report.csv", buf.getvalue())
    atomic.write_text(run_dir / "report.md", _markdown(run_dir, meta, summary, rows,
                                                       _forecast_markdown(forecast, forecast_summary(forecast))))
    return report


def report_finished_run(run_dir: str | Path, summary: dict) -> Path | None:
    """After `train()`: write the report of a run that finished (rank 0), add its files to the run's manifest,
    and return report.md. A failure is logged and leaves the finished run as it is (returns None)."""
    import logging

    from selmix_dist import distributed as dist
    from selmix_dist.train.rundir import RunDir

    if summary["stopped_by"] not in ("completed", "early_stop") or not dist.is_main_process():
        return None
    log = logging.getLogger("selmix_dist.report")
    try:
        write_report(run_dir)
    except Exception as err:  # plotting or a malformed file must not fail a finished run
        log.warning("the run is complete, but its report could not be written: %s (retry: python tools/report.py "
                    "%s)", err, run_dir)
        return None
    run = RunDir(run_dir)
    run.manifest()
    run.record(*[run / name for name in OUTPUTS if (run / name).exists()])
    log.info("report: %s", run / "report.md")
    return run / "report.md"
