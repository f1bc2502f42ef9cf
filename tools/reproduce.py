"""Reproduce SelMix on CIFAR-10-LT with frozen EfficientNet-Lite0 features: every baseline and every SelMix
objective, mean ± std over seeds (issue 5; the work is in selmix_dist/reproduce.py).

    python tools/reproduce.py --data ../shared/data/cifar10-jpeg.tar.gz --seeds 0 1 2 --out runs/reproduce

Features of all CIFAR-10 train and test images are extracted once into --cache (reruns read them); each
(ρ_u, seed) split only indexes their rows. Prints one markdown table per ρ_u and writes results.json,
results.csv and tables.md under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selmix_dist.reproduce import (
    CSST_OBJECTIVES,
    METHODS,
    Hyper,
    LTSplitSpec,
    ReproduceConfig,
    TuneGrid,
    reproduce,
    results_markdown,
    tune,
)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> tuple[ReproduceConfig, argparse.Namespace]:
    hp, spec, grid = Hyper(), LTSplitSpec(), TuneGrid()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"),
                   help="CIFAR-10 JPEG archive (.tar.gz, unpacked once into --cache) or its unpacked folder")
    p.add_argument("--cache", default=os.environ.get("SELMIX_CACHE_DIR", str(REPO / ".cache")),
                   help="where the archive is unpacked and the feature cache lives")
    p.add_argument("--out", default=str(REPO / "runs" / "reproduce"), help="results and run directories")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rho-u", type=float, nargs="+", default=[100.0, 1.0], help="unlabeled imbalance ratios")
    p.add_argument("--image-size", type=int, default=128, help="backbone input side (CIFAR images are 32 px)")
    p.add_argument("--subset", type=int, nargs=2, metavar=("TRAIN", "TEST"), default=None,
                   help="use only the first TRAIN / TEST images per class (reduced runs; scale --n1 etc.)")
    p.add_argument("--n1", type=int, default=spec.n1, help="labeled images of the head class")
    p.add_argument("--m1", type=int, default=spec.m1, help="unlabeled images of the head class")
    p.add_argument("--rho-l", type=float, default=spec.rho_l, help="labeled imbalance ratio")
    p.add_argument("--n-val", type=int, default=spec.n_val, help="validation images per class (no flips)")
    p.add_argument("--steps", type=int, default=hp.steps,
                   help="fine-tuning steps of SelMix, uniform mixup and CSST (one budget for all)")
    p.add_argument("--lr", type=float, default=hp.lr, help="SelMix / mixup head learning rate")
    p.add_argument("--csst-lr", type=float, nargs="+", default=[hp.csst_lrs[o] for o in CSST_OBJECTIVES],
                   help=f"CSST-style learning rate: one for all, or one per objective ({' '.join(CSST_OBJECTIVES)})")
    p.add_argument("--temperature", type=float, default=hp.temperature, help="T of P = softmax(G / T)")
    p.add_argument("--selftrain-steps", type=int, default=hp.selftrain_steps,
                   help="steps of the FixMatch-LA analogue (the SelMix start)")
    p.add_argument("--selftrain-lr", type=float, default=hp.selftrain_lr, help="its learning rate")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="subset of methods")
    p.add_argument("--tune", action="store_true",
                   help="instead of the reproduction: the validation-only grid below on the first seed and ρ_u")
    p.add_argument("--tune-selftrain-lr", type=float, nargs="+", default=list(grid.selftrain_lrs),
                   help="FixMatch-LA analogue lr grid")
    p.add_argument("--tune-lr", type=float, nargs="+", default=list(grid.lrs), help="SelMix lr grid")
    p.add_argument("--tune-steps", type=int, nargs="+", default=list(grid.steps), help="SelMix steps grid")
    p.add_argument("--tune-csst-lr", type=float, nargs="+", default=list(grid.csst_lrs), help="CSST lr grid")
    p.add_argument("--extract-batch-size", type=int, default=128)
    p.add_argument("--progress", action="store_true", help="progress bars during feature extraction")
    a = p.parse_args(argv)
    if len(a.csst_lr) not in (1, len(CSST_OBJECTIVES)):
        p.error(f"--csst-lr takes 1 or {len(CSST_OBJECTIVES)} values")
    lrs = a.csst_lr * len(CSST_OBJECTIVES) if len(a.csst_lr) == 1 else a.csst_lr
    csst_lrs = dict(zip(CSST_OBJECTIVES, lrs, strict=True))
    hyper = Hyper(steps=a.steps, lr=a.lr, csst_lrs=csst_lrs, temperature=a.temperature,
                  selftrain_steps=a.selftrain_steps, selftrain_lr=a.selftrain_lr)
    cfg = ReproduceConfig(
        data=Path(a.data), out=Path(a.out), cache=Path(a.cache), seeds=a.seeds, rho_us=a.rho_u,
        image_size=a.image_size, subset=tuple(a.subset) if a.subset else None,
        spec=LTSplitSpec(n1=a.n1, m1=a.m1, rho_l=a.rho_l, n_val=a.n_val), hyper=hyper, methods=a.methods,
        extract_batch_size=a.extract_batch_size, progress=a.progress)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, a = parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if a.tune:
        tune(cfg, TuneGrid(a.tune_selftrain_lr, a.tune_lr, a.tune_steps, a.tune_csst_lr), log=log)
        return 0
    result = reproduce(cfg, log=log)
    print()
    print(results_markdown(result))
    print(f"results: {cfg.out / 'results.json'}, {cfg.out / 'results.csv'}, {cfg.out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
