"""Run an experiment file (configs/experiments/*.yaml) on frozen-backbone features: every method, mean ± std over
seeds, one table per ρ_u (the work is in selmix_dist/experiments).

    python tools/reproduce.py --experiment configs/experiments/cifar10_lt.yaml
    python tools/reproduce.py --experiment configs/experiments/tiny_imagenet_lt.yaml --methods 'selmix_*'

Features of every train and test image are extracted once into --cache (reruns read them); each (ρ_u, seed)
split only indexes their rows. Finished results are stored under --out as they complete and skipped on a
rerun (a changed setting is recomputed, with what starts from it). Prints the tables and writes
results.json, results.csv and tables.md under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selmix_dist.experiments.data import Subset
from selmix_dist.experiments.runner import run_experiment
from selmix_dist.experiments.spec import describe, load_spec
from selmix_dist.experiments.tables import results_markdown

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", help="experiment file (YAML)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override keys of the experiment file, e.g. trainer.run.steps=500 methods.la.max_iter=100")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the file's)")
    p.add_argument("--rho-u", type=float, nargs="+", default=None, help="unlabeled imbalance ratios (default: "
                   "the file's)")
    p.add_argument("--methods", nargs="+", default=None, metavar="PATTERN",
                   help="methods to report, by name or pattern ('selmix_*'); their start heads run as needed")
    p.add_argument("--recompute", nargs="+", default=[], metavar="PATTERN",
                   help="methods whose stored results are ignored and replaced (e.g. after a code change)")
    p.add_argument("--subset", type=int, nargs=2, metavar=("TRAIN", "TEST"), default=None,
                   help="only the first TRAIN / TEST images per class (reduced runs; scale split.* with --set)")
    p.add_argument("--subset-classes", type=int, default=None, metavar="K",
                   help="only the first K classes in source order (reduced runs)")
    p.add_argument("--out", default=None, help="results directory (default runs/experiments/<name>)")
    p.add_argument("--cache", default=os.environ.get("SELMIX_CACHE_DIR", str(REPO / ".cache")),
                   help="where archives are unpacked and feature caches live")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder of the archives")
    p.add_argument("--describe", action="store_true", help="print every experiment key and method kind, then exit")
    a = p.parse_args(argv)
    if not a.describe and not a.experiment:
        p.error("--experiment is required")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.describe:
        print(describe())
        return 0
    try:
        spec = load_spec(a.experiment, a.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else REPO / "runs" / "experiments" / spec.name
    subset = Subset(*(a.subset or (None, None)), classes=a.subset_classes)
    try:
        result = run_experiment(spec, out=out, cache=Path(a.cache), data_dir=Path(a.data_dir), seeds=a.seeds,
                                rho_us=a.rho_u, methods=a.methods, subset=subset, recompute=a.recompute,
                                log=lambda line: print(line, flush=True))
    except KeyboardInterrupt as stop:
        print(f"interrupted ({stop or 'Ctrl-C'}): the finished results are stored under {out}; the same command "
              "continues from them", file=sys.stderr)
        return 130
    print()
    print(results_markdown(result))
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
