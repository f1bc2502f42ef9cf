"""Run an experiment: features → per (seed, ρ_u) split → every method → validation and test metrics.

Each finished (seed, ρ_u, method) result is stored as it completes (``store.ResultStore``) and read back on a
rerun, so an interrupted run resumes where it stopped and a rerun after changing one method's settings
recomputes only that method and the methods that start from it. Progress lines give the seconds of each
result and an ETA from the mean seconds per method seen so far.

Head selection: every fine-tuned head is the *final* head of its run (no checkpoint chosen on validation or
test), for all methods alike. Writes ``results.json`` (everything), ``results.csv`` (one line per ρ_u, seed,
method and split) and ``tables.md`` under ``out``.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix_dist import atomic
from selmix_dist.config import _closest, load_config
from selmix_dist.core import head_tail_masks
from selmix_dist.experiments.data import Subset, load_experiment_features, lt_train_data
from selmix_dist.experiments.methods import (
    KINDS,
    MethodContext,
    SplitRows,
    TrainerSession,
    all_rows,
    method_meta,
    start_metric,
    start_names,
    trainer_overrides,
)
from selmix_dist.experiments.spec import ExperimentSpec, spec_dict
from selmix_dist.experiments.store import ResultStore, digest
from selmix_dist.experiments.tables import METRICS, results_markdown
from selmix_dist.features.sets import FeatureSet, TrainData


def select_methods(spec: ExperimentSpec, patterns: Sequence[str] | None) -> list[str]:
    """Method names matching any of ``patterns`` (fnmatch, e.g. 'selmix_*'; None: all), in file order."""
    names = list(spec.methods)
    if patterns is None:
        return names
    for p in patterns:
        if not fnmatch.filter(names, p):
            raise ValueError(f"{spec.path}: no method matches '{p}'{_closest(p, names)}; methods: {names}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def with_starts(spec: ExperimentSpec, names: Sequence[str]) -> list[str]:
    """``names`` and every method they start from, each after its start (start chains are loop-free)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for start in start_names(spec.methods[name].settings):
            visit(start)
        order.append(name)

    for n in names:
        visit(n)
    return order


def uses_unlabeled(spec: ExperimentSpec, name: str) -> bool:
    """Whether the method's head depends on the unlabeled set, itself or through its start head."""
    m = spec.methods[name]
    return KINDS[m.kind].uses_unlabeled or any(uses_unlabeled(spec, s) for s in start_names(m.settings))


def result_keys(spec: ExperimentSpec, subset: Subset, seed: int, rho_u: float, names: Sequence[str]) -> dict[str, str]:
    """Digest of every method's result for (seed, ρ_u): data, split, seed, ρ_u (methods that see unlabeled
    data), resolved settings, and the start head's digest. ``names`` must list starts first."""
    data = {"name": spec.name, "data": dataclasses.asdict(spec.data), "split": dataclasses.asdict(spec.split),
            "features": dataclasses.asdict(spec.features), "subset": dataclasses.asdict(subset), "seed": seed}
    keys: dict[str, str] = {}
    for name in names:
        m = spec.methods[name]
        start = getattr(m.settings, "start", "")
        start_key = [keys[s] for s in start] if isinstance(start, list) else keys[start] if start else None
        keys[name] = digest({**data, "rho_u": rho_u if uses_unlabeled(spec, name) else None, "kind": m.kind,
                             "settings": KINDS[m.kind].resolve(m.settings, spec.trainer), "start": start_key})
    return keys


@dataclass
class SplitRun:
    """One (seed, ρ_u): the split and its tensors, the test set, the evaluation's head mask bool[K], every
    method's result key and the heads computed so far."""

    seed: int
    rho_u: float
    data: TrainData
    rows: SplitRows
    test: FeatureSet
    head_mask: torch.Tensor
    keys: dict[str, str]
    heads: dict[str, nn.Linear]

    def where(self, spec: ExperimentSpec, name: str) -> float | None:
        """The ρ_u a method's result is stored under: None when its head does not depend on ρ_u."""
        return self.rho_u if uses_unlabeled(spec, name) else None


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts results and estimates the remaining time from the mean seconds per method seen so far."""

    def __init__(self, total: int, to_compute: dict[str, int], log: Callable[[str], None]):
        self.total, self.to_compute, self.log = total, dict(to_compute), log
        self.done, self.t0 = 0, time.perf_counter()
        self.seen: dict[str, list[float]] = {}

    def observe(self, method: str, seconds: float) -> None:
        self.seen.setdefault(method, []).append(seconds)

    def eta(self) -> str:
        known = [s for v in self.seen.values() for s in v]
        if not any(self.to_compute.values()):
            return "0:00:00"
        if not known:
            return "?"
        fallback = sum(known) / len(known)
        left = sum(n * (sum(self.seen[m]) / len(self.seen[m]) if m in self.seen else fallback)
                   for m, n in self.to_compute.items())
        return _clock(left)

    def step(self, method: str, seconds: float, computed: bool, text: str) -> None:
        self.done += 1
        if computed:
            self.to_compute[method] -= 1
        how = f"{seconds:7.1f} s" if computed else " stored  "
        self.log(f"[{self.done:>{len(str(self.total))}}/{self.total}] {text} {how} | elapsed "
                 f"{_clock(time.perf_counter() - self.t0)}, ETA {self.eta()}")


def evaluate(head: nn.Linear, fs: FeatureSet, head_mask: torch.Tensor) -> dict[str, float]:
    from selmix_dist.heads import evaluate_head

    return evaluate_head(head, all_rows(fs), fs.labels, len(head_mask), head_mask=head_mask)


def run_experiment(spec: ExperimentSpec, *, out: Path, cache: Path, data_dir: Path,
                   seeds: Sequence[int] | None = None, rho_us: Sequence[float] | None = None,
                   methods: Sequence[str] | None = None, subset: Subset | None = None,
                   recompute: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the experiment; return the results dict also written to ``out``.

    seeds / rho_us / methods (fnmatch patterns) default to the experiment's; the starts of the selected
    methods are computed (or read) as needed but reported only if selected. ``recompute``: patterns of
    methods whose stored results are ignored and replaced.
    """
    t_start = time.perf_counter()
    subset = subset or Subset()
    seeds = list(spec.seeds if seeds is None else seeds)
    rho_us = [float(r) for r in (spec.rho_u if rho_us is None else rho_us)]
    wanted = select_methods(spec, methods)
    plan = with_starts(spec, wanted)
    redo = set(select_methods(spec, recompute)) if recompute else set()
    out = Path(out)
    store = ResultStore(out / "store")

    features = load_experiment_features(spec, cache, data_dir, subset, log)
    t_features = time.perf_counter() - t_start
    head_fraction = load_config(None, trainer_overrides(spec.trainer)).data.head_fraction
    keys = {(s, r): result_keys(spec, subset, s, r, plan) for s in seeds for r in rho_us}
    pending = _pending(spec, store, keys, plan, redo)
    to_compute = {n: sum(1 for (s, r, m) in pending if m == n) for n in plan}
    progress = Progress(len(seeds) * len(rho_us) * len(plan), to_compute, log)
    log(f"{spec.name}: {len(plan)} methods × {len(seeds)} seeds × {len(rho_us)} ρ_u; "
        f"{len(pending)} results to compute, the rest stored in {store.root}")

    session = TrainerSession()
    records, computed_s, computed = [], 0.0, 0
    done: set[tuple[int, float | None, str]] = set()     # computed in this run (labeled-only ones once per seed)
    try:
        for seed in seeds:
            for rho_u in rho_us:
                data, _ = lt_train_data(features, spec.split, rho_u, seed)
                unit = SplitRun(seed, rho_u, data, SplitRows.of(data), features.test_split(),
                                head_tail_masks(data.train_class_counts(), head_fraction=head_fraction)[0],
                                keys[(seed, rho_u)], {})
                for name in plan:
                    where = unit.where(spec, name)
                    todo = (seed, where, name) in pending and (seed, where, name) not in done
                    record = None if todo else store.get(name, seed, where, unit.keys[name])
                    if record is None:
                        record = _compute(spec, name, unit, store, session, out / "runs")
                        done.add((seed, where, name))
                        computed_s += record["seconds"]
                        computed += 1
                    progress.step(name, record["seconds"], todo, f"seed={seed} ρ_u={rho_u:g} {name:<34s}")
                    progress.observe(name, record["seconds"])
                    if name in wanted:
                        records.append({**record, "rho_u": rho_u})
    finally:
        session.close()
    threads = sorted({r["torch_threads"] for r in records if "torch_threads" in r})
    if len(threads) > 1:
        log(f"warning: these results were fitted with {threads} torch threads (their records' torch_threads); "
            "a fit's float results depend on it: for one table, --recompute them under one OMP_NUM_THREADS")
    result = {"experiment": spec_dict(spec), "path": spec.path, "subset": dataclasses.asdict(subset),
              "seeds": seeds, "rho_u": rho_us, "class_names": features.class_names,
              "feature_cache": str(features.cache_dir),
              "methods": {n: method_meta(spec.methods[n].kind, spec.methods[n].label, spec.methods[n].settings,
                                         spec.trainer) for n in wanted},
              "records": records,
              "timings": {"features_s": t_features, "extract_s": features.extract_seconds, "methods_s": computed_s,
                          "computed": computed, "stored": len(seeds) * len(rho_us) * len(plan) - computed,
                          "total_s": time.perf_counter() - t_start}}
    write_results(result, out)
    return result


def _pending(spec: ExperimentSpec, store: ResultStore, keys: dict, plan: Sequence[str],
             redo: set[str]) -> set[tuple[int, float | None, str]]:
    """(seed, ρ_u or None for labeled-only methods, method) of every result that must be computed."""
    pending = set()
    for (seed, rho_u), k in keys.items():
        for name in plan:
            where = rho_u if uses_unlabeled(spec, name) else None
            if name in redo or store.get(name, seed, where, k[name]) is None:
                pending.add((seed, where, name))
    return pending


def _compute(spec: ExperimentSpec, name: str, unit: SplitRun, store: ResultStore, session: TrainerSession,
             runs: Path) -> dict:
    """Run one method, evaluate it on validation and test, store its head and record; return the record."""
    m = spec.methods[name]
    starts = {s: unit.heads[s] if s in unit.heads else store.head(s, unit.seed, unit.where(spec, s), unit.keys[s])
              for s in start_names(m.settings)}
    ctx = MethodContext(data=unit.data, rows=unit.rows, seed=unit.seed, head_mask=unit.head_mask,
                        experiment_trainer=spec.trainer, starts=starts, session=session,
                        start_metric=start_metric(m.kind, m.settings, spec.trainer),
                        run_dir=runs / f"seed{unit.seed}" / f"rho_u{unit.rho_u:g}" / name)
    t0 = time.perf_counter()
    head = KINDS[m.kind].run(ctx, m.settings)
    seconds = time.perf_counter() - t0
    where, key = unit.where(spec, name), unit.keys[name]
    # The thread count changes a fit's float results, and the store key does not hold it: recorded, to be seen.
    record = {"method": name, "kind": m.kind, "seed": unit.seed, "rho_u": where, "digest": key, "seconds": seconds,
              "torch_threads": torch.get_num_threads(),
              "settings": KINDS[m.kind].resolve(m.settings, spec.trainer), "info": ctx.info,
              "val": evaluate(head, unit.data.val, unit.head_mask), "test": evaluate(head, unit.test, unit.head_mask)}
    store.put(name, unit.seed, where, key, record, head)
    unit.heads[name] = head
    return record


def write_results(result: dict[str, Any], out: Path) -> None:
    """results.json (everything), results.csv (one line per ρ_u, seed, method and split), tables.md."""
    atomic.write_text(out / "results.json", json.dumps(result, indent=1, default=str) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rho_u", "seed", "method", "split", *METRICS, "accuracy", "seconds"])
    for r in result["records"]:
        for split in ("val", "test"):
            writer.writerow([r["rho_u"], r["seed"], r["method"], split, *(r[split][m] for m in METRICS),
                             r[split]["accuracy"], r["seconds"]])
    atomic.write_text(out / "results.csv", buffer.getvalue())
    atomic.write_text(out / "tables.md", results_markdown(result))

