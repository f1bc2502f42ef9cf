"""Why SelMix does (not) help on an experiment's data: for its SelMix runs of one (seed, ρ_u), whether the gain
predicts, where P puts the "label i" draws, and how good the partners' pseudo-labels are (docs/results.md).

    python tools/diagnose_selmix.py --experiment configs/experiments/tiny_imagenet_lt.yaml \\
        --out runs/experiments/tiny_imagenet_lt --seed 0 --rho-u 100 [--json]

Reads the runs that tools/reproduce.py left under --out/runs/seed<s>/rho_u<r>/<method> (forecast.jsonl, the last
P snapshot, config.yaml) and the experiment's cached features (the true labels of the unlabeled split, which the
runs never see). Per method: refresh intervals, Σ predicted and Σ realised change of ψ, their correlation; the
share of P's label-class mass on the tail classes (the 10 % least frequent) against their share of the labeled
rows, and the expected number of times a tail labeled sample is drawn as "label i" over the run. Per split: the
pseudo-label precision (start head argmax, as the trainer labels partners) averaged over head and tail classes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml

from selmix_dist.cli import run_cli
from selmix_dist.core import head_tail_masks
from selmix_dist.experiments.data import Subset, load_experiment_features, lt_train_data
from selmix_dist.experiments.methods import start_names
from selmix_dist.experiments.runner import uses_unlabeled
from selmix_dist.experiments.spec import ExperimentSpec, load_spec
from selmix_dist.experiments.store import ResultStore
from selmix_dist.heads.evaluate import predict
from selmix_dist.report import forecast_summary, load_forecast

REPO = Path(__file__).resolve().parents[1]


def pseudo_label_precision(head: torch.nn.Linear, features: torch.Tensor, true: torch.Tensor,
                           mask: torch.Tensor) -> dict[str, float]:
    """Precision of argmax pseudo-labels per predicted class, averaged over head / tail classes that get one."""
    k = len(mask)
    pred = predict(head, features)
    hits = torch.bincount(pred[pred == true], minlength=k).double()
    given = torch.bincount(pred, minlength=k).double()
    precision = hits / given.clamp_min(1)
    out = {"accuracy": float((pred == true).double().mean())}
    for name, group in (("head", mask), ("tail", ~mask)):
        used = group & (given > 0)
        out[f"{name}_precision"] = float(precision[used].mean()) if bool(used.any()) else 0.0
        out[f"{name}_labelled_share"] = float(given[group].sum() / given.sum())
    return out


def run_diagnostics(run_dir: Path, labeled_counts: torch.Tensor, mask: torch.Tensor) -> dict:
    """forecast summary and P's tail mass / reuse of one SelMix run directory."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    out = {"forecast": forecast_summary(load_forecast(run_dir))}
    snapshot = torch.load(run_dir / "distribution_last.pt", map_location="cpu", weights_only=True)
    label_mass = snapshot["P"].double().sum(dim=1)
    tail = ~mask
    draws = cfg["optim"]["batch_size"] * cfg["run"]["steps"]
    out["tail_label_mass"] = float(label_mass[tail].sum())
    out["tail_labeled_share"] = float(labeled_counts[tail].sum() / labeled_counts.sum())
    out["tail_draws_per_sample"] = float((draws * label_mass[tail] / labeled_counts[tail]).mean())
    out["head_draws_per_sample"] = float((draws * label_mass[mask] / labeled_counts[mask]).mean())
    return out


def selmix_start(spec: ExperimentSpec) -> str:
    """The start head of the experiment's SelMix runs (the first SelMix method's, by name)."""
    for name, method in spec.methods.items():
        if name.startswith("selmix_") and method.kind == "trainer" and start_names(method.settings):
            return start_names(method.settings)[0]
    raise ValueError(f"{spec.path}: no SelMix method (kind trainer, named selmix_*) with a start head; give --start")


def start_head(spec: ExperimentSpec, out: Path, start: str, seed: int, rho_u: float) -> torch.nn.Linear:
    """The head of method ``start`` that this --out's results.json reports for (seed, ρ_u): the store holds one
    file per configuration it ever ran, and the digest in results.json names the current one."""
    if start not in spec.methods:
        raise ValueError(f"--start {start!r}: not a method of {spec.path}")
    results = out / "results.json"
    records = json.loads(results.read_text(encoding="utf-8"))["records"] if results.is_file() else []
    digests = {r["digest"] for r in records if r["method"] == start and r["seed"] == seed and r["rho_u"] == rho_u}
    if len(digests) != 1:
        raise ValueError(f"{results}: no result of {start} for seed {seed}, ρ_u {rho_u:g} "
                         f"({len(digests)} found); run tools/reproduce.py with this --out first")
    return ResultStore(out / "store").head(start, seed, rho_u if uses_unlabeled(spec, start) else None,
                                           digests.pop())


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True, help="the results directory of tools/reproduce.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rho-u", type=float, default=100.0)
    p.add_argument("--start", help="the method whose head labels the partners (default: the SelMix methods' start)")
    p.add_argument("--cache", default=os.environ.get("SELMIX_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    spec = load_spec(a.experiment, [])
    a.start = a.start or selmix_start(spec)
    head = start_head(spec, Path(a.out), a.start, a.seed, a.rho_u)  # before the features: a missing run fails fast
    features = load_experiment_features(spec, Path(a.cache), Path(a.data_dir), Subset(), log=lambda _: None)
    data, rows = lt_train_data(features, spec.split, a.rho_u, a.seed)
    counts = torch.bincount(data.labeled.labels, minlength=data.num_classes)
    mask, _ = head_tail_masks(counts, head_fraction=0.9)
    where = Path(a.out) / "runs" / f"seed{a.seed}" / f"rho_u{a.rho_u:g}"
    result = {"seed": a.seed, "rho_u": a.rho_u, "start": a.start, "methods": {}}
    unlabeled = features.train.features[rows["unlabeled"]].float()
    result["pseudo_labels"] = pseudo_label_precision(head, unlabeled, features.train.labels[rows["unlabeled"]], mask)
    for run_dir in sorted(d for d in where.glob("selmix_*") if (d / "forecast.jsonl").is_file()):
        result["methods"][run_dir.name] = run_diagnostics(run_dir, counts, mask)
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    q = result["pseudo_labels"]
    print(f"pseudo-labels of {a.start} on the unlabeled split: accuracy {q['accuracy']:.3f}, precision head "
          f"{q['head_precision']:.3f} / tail {q['tail_precision']:.3f}, tail classes get "
          f"{100 * q['tail_labelled_share']:.1f} % of the labels")
    print("| method | intervals | Σ predicted Δψ | Σ realised Δψ | same sign | corr | P tail label mass | "
          "tail share of labeled | draws per tail sample | draws per head sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in result["methods"].items():
        f = r["forecast"] or {}
        corr = "n/a" if f.get("correlation") is None else f"{f['correlation']:.2f}"
        print(f"| {name} | {f.get('intervals', 0)} | {f.get('predicted_sum', 0):+.4g} | {f.get('realised_sum', 0):+.4g}"
              f" | {100 * f.get('same_sign', 0):.0f} % | {corr} | {r['tail_label_mass']:.3f} | "
              f"{r['tail_labeled_share']:.3f} | {r['tail_draws_per_sample']:.0f} | {r['head_draws_per_sample']:.0f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
