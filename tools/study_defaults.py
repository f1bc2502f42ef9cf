"""Study of SelMix defaults that hold across backbones and image sizes (issue "defaults that hold across
backbones"): the temperature rule of P and the learning rate, on VALIDATION only.

Each (base method, temperature rule, value, learning rate) becomes a method of the experiment (a copy of the
base SelMix method's entry with ``selmix.temperature_rule``, ``selmix.temperature`` / ``selmix.target_support``
and ``optim.lr`` set in its ``trainer`` keys), so the runner trains it from the experiment's start head and
stores it like any other method. Per variant the table gives validation min recall / H-mean / mean recall,
the effective number of class pairs exp(H(P)) of P at the last refresh (from ``distribution_last.pt`` of the
run directory) and its minimum / median over all refreshes (the run's TensorBoard scalar), max|G| at the last
refresh and the seconds; above it the mean squared feature norm E‖x‖² of the
split (labeled, unlabeled and validation rows), on which the gain G and the SGD step size both scale.

    python tools/study_defaults.py --experiment configs/experiments/tiny_imagenet_lt.yaml \\
        --bases selmix_min_recall selmix_h_mean --rules absolute:0.1 relative:0.1 support:1 --lrs 3e-3 \\
        --set trainer.run.steps=1500 --out runs/study_defaults/tiny128

The feature cache must be complete (this tool never extracts: run tools/reproduce.py or the extraction job
first). Test metrics are recorded by the runner under --out but never printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import torch

from selmix_dist.core import effective_support
from selmix_dist.experiments.data import Subset, feature_cache_dir, load_experiment_features, lt_train_data
from selmix_dist.experiments.runner import run_experiment
from selmix_dist.experiments.spec import ExperimentSpec, load_spec
from selmix_dist.features.cache import read_manifest

REPO = Path(__file__).resolve().parents[1]
RULES = {"absolute": "selmix.temperature", "relative": "selmix.temperature", "support": "selmix.target_support"}
COLUMNS = ("min_recall", "h_mean", "mean_recall")


def parse_rule(text: str) -> tuple[str, float]:
    """'support:0.25' -> ('support', 0.25); the value is T (absolute, relative) or target_support (support)."""
    rule, sep, value = text.partition(":")
    if not sep or rule not in RULES:
        raise ValueError(f"rule '{text}' must be RULE:VALUE with RULE one of {sorted(RULES)}")
    number = float(value)
    if not number > 0:
        raise ValueError(f"rule '{text}': the value must be > 0")
    return rule, number


def variant_name(base: str, rule: str, value: float, lr: float) -> str:
    """A method name (letters, digits, '_') for one variant, e.g. 'selmix_h_mean__support_0p25__lr_0p003'."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{base}__{rule}_{value:g}__lr_{lr:g}".replace(".", "p"))


def variant_entry(spec: ExperimentSpec, base: str, rule: str, value: float, lr: float) -> dict:
    """The method entry of one variant: the base method's entry with the rule, its value and lr as trainer keys."""
    if base not in spec.methods or spec.methods[base].kind != "trainer":
        raise ValueError(f"{spec.path}: --bases: '{base}' is not a method of kind 'trainer'; methods: "
                         f"{[n for n, m in spec.methods.items() if m.kind == 'trainer']}")
    s = spec.methods[base].settings
    # TensorBoard on: the monitor's selmix/effective_support scalar gives P's support at every refresh
    trainer = {**s.trainer, "selmix.temperature_rule": rule, RULES[rule]: value, "optim.lr": lr,
               "log.tensorboard": True}
    return {"kind": "trainer", "label": f"{base} {rule}={value:g} lr={lr:g}", "start": s.start,
            "objective": s.objective, "params": dict(s.params), "trainer": trainer}


def last_refresh(run_dir: Path) -> dict[str, float]:
    """Effective pairs exp(H(P)) and max|G| of the last refresh of a finished run (its distribution_last.pt)."""
    path = Path(run_dir) / "distribution_last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run did not finish or did not refresh")
    snap = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": int(snap["step"]), "pairs": effective_support(snap["P"]),
            "max_abs_gain": float(snap["G"].abs().max())}


def support_history(run_dir: Path) -> list[float]:
    """P's effective pairs at every refresh, in step order (the run's selmix/effective_support scalar)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if "selmix/effective_support" not in events.Tags()["scalars"]:
        raise FileNotFoundError(f"{run_dir}/tb has no selmix/effective_support scalar (log.tensorboard off?)")
    return [e.value for e in sorted(events.Scalars("selmix/effective_support"), key=lambda e: e.step)]


def mean_squared_norm(x: torch.Tensor) -> float:
    """E‖x‖² over the rows of x float[N, d]."""
    return float(x.to(torch.float64).pow(2).sum(1).mean())


def require_complete_cache(spec: ExperimentSpec, cache: Path) -> None:
    """ValueError unless both splits of the experiment's feature cache are complete (no extraction here)."""
    folder = feature_cache_dir(spec, cache)
    manifest = read_manifest(folder) if (folder / "manifest.json").is_file() else {"splits": {}}
    missing = [s for s in ("train", "test") if not manifest["splits"].get(s, {}).get("complete")]
    if missing:
        raise ValueError(f"feature cache {folder}: split(s) {missing} not complete; extract them first")


def split_norm(spec: ExperimentSpec, cache: Path, data_dir: Path, seed: int, rho_u: float) -> float:
    """E‖x‖² over the labeled, unlabeled and validation rows of the (seed, ρ_u) split."""
    features = load_experiment_features(spec, cache, data_dir, Subset(), log=lambda _line: None)
    _, rows = lt_train_data(features, spec.split, rho_u, seed)
    return mean_squared_norm(features.train.features[torch.cat(list(rows.values()))])


def study(spec_path: str, overrides: list[str], bases: list[str], rules: list[tuple[str, float]],
          lrs: list[float], *, seed: int, rho_u: float, out: Path, cache: Path, data_dir: Path) -> dict:
    """Train every variant (stored results are reused) and collect its validation metrics and P's support."""
    spec = load_spec(spec_path, overrides)
    require_complete_cache(spec, cache)
    variants = {variant_name(b, r, v, lr): (b, r, v, lr) for b in bases for r, v in rules for lr in lrs}
    extra = [f"methods.{name}={json.dumps(variant_entry(spec, *key))}" for name, key in variants.items()]
    spec = load_spec(spec_path, [*overrides, *extra])
    result = run_experiment(spec, out=out, cache=cache, data_dir=data_dir, seeds=[seed], rho_us=[rho_u],
                            methods=list(variants), log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = []
    for record in result["records"]:
        base, rule, value, lr = variants[record["method"]]
        run_dir = out / "runs" / f"seed{seed}" / f"rho_u{rho_u:g}" / record["method"]
        history = support_history(run_dir)
        rows.append({"base": base, "rule": rule, "value": value, "lr": lr, "seconds": record["seconds"],
                     **{m: record["val"][m] for m in COLUMNS}, **last_refresh(run_dir),
                     "pairs_min": min(history), "pairs_median": statistics.median(history),
                     "refreshes_below_2": sum(v < 2.0 for v in history), "refreshes": len(history)})
    return {"experiment": spec.name, "features": f"{spec.features.tag}-{spec.features.image_size}",
            "num_classes": len(result["class_names"]), "seed": seed, "rho_u": rho_u,
            "steps": spec.trainer.get("run.steps"), "overrides": overrides,
            "mean_sq_norm": split_norm(spec, cache, data_dir, seed, rho_u), "rows": rows}


def table(s: dict) -> str:
    k = s["num_classes"]
    lines = [f"{s['experiment']} {s['features']}, seed {s['seed']}, ρ_u = {s['rho_u']:g}, {s['steps']} steps; "
             f"K = {k}, E‖x‖² = {s['mean_sq_norm']:.1f}. Validation only.", "",
             "| method | rule | value | lr | val min recall | val H-mean | val mean recall "
             "| pairs of P at the end (/K) "
             "| pairs min / median over refreshes | refreshes with < 2 pairs | max\\|G\\| at the end | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['base']} | {r['rule']} | {r['value']:g} | {r['lr']:g} | {r['min_recall']:.4f} "
                     f"| {r['h_mean']:.4f} | {r['mean_recall']:.4f} | {r['pairs']:.1f} ({r['pairs'] / k:.2f}) "
                     f"| {r['pairs_min']:.1f} / {r['pairs_median']:.1f} | {r['refreshes_below_2']}/{r['refreshes']} "
                     f"| {r['max_abs_gain']:.3g} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", required=True, help="experiment file (YAML)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="experiment overrides (as reproduce.py)")
    p.add_argument("--bases", nargs="+", default=["selmix_min_recall", "selmix_h_mean"],
                   help="SelMix methods of the experiment whose entries the variants copy")
    p.add_argument("--rules", nargs="+", default=["absolute:0.1", "relative:0.1", "relative:0.3", "support:0.25",
                                                   "support:1", "support:4"], metavar="RULE:VALUE")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3], help="optim.lr values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rho-u", type=float, default=100.0)
    p.add_argument("--out", required=True, help="results directory (the runner's store and run directories)")
    p.add_argument("--cache", default=os.environ.get("SELMIX_CACHE_DIR", str(REPO / ".cache")))
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", action="store_true", help="print the study as JSON instead of a table")
    a = p.parse_args(argv)
    try:
        rules = [parse_rule(r) for r in a.rules]
        s = study(a.experiment, a.set, a.bases, rules, a.lrs, seed=a.seed, rho_u=a.rho_u, out=Path(a.out),
                  cache=Path(a.cache), data_dir=Path(a.data_dir))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=1) if a.json else table(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
