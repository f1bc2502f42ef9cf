"""Make a long-tailed semi-supervised split (docs/method.md §1.2) of an image source and write its split lists.

    # CIFAR-10-LT, ρ_l = 100, ρ_u = 100 (use --rho-u 1 or --m1 30 --rho-u 1/100 for the other profiles)
    python tools/make_lt_split.py --kind imagefolder --source data/cifar10/train \
        --test-source data/cifar10/test --n1 1500 --rho-l 100 --m1 3000 --rho-u 100 --n-val 500 \
        --seed 0 --out runs/splits/cifar10_lt
    # a Hugging Face DatasetDict written with save_to_disk: name its split with --option
    python tools/make_lt_split.py --kind hf --source data/my_hf_dataset --option split=train --n-test 50 ...

Writes labeled.txt, unlabeled.txt (labels −1), val.txt, test.txt, split.json and
unlabeled_true_labels.diagnostic.txt into --out, and prints the per-class counts.

The split is drawn from the labels alone: no image is decoded here (an ImageNet-size folder would take longer
than the extraction). A corrupt or non-image file stays in its list, and tools/extract_features.py stops at
it, naming the split, the row and the file; replace the file, or remove it and remake the split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selmix_dist.cli import key_value, parser, run_cli
from selmix_dist.data.sources import SOURCE_KINDS, open_source
from selmix_dist.data.splits import MANIFEST, make_lt_split


def ratio(text: str) -> float:
    """A positive number, also written as a fraction such as 1/100."""
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a ratio: {text!r}") from None
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--kind", required=True, choices=sorted(SOURCE_KINDS), help="source kind")
    p.add_argument("--source", required=True,
                   help="source path (image folder, list file, shard dir, HF dataset dir, .npz)")
    p.add_argument("--option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for open_source, e.g. root=data/imagenet, or split=train for a Hugging Face "
                        "DatasetDict (repeatable)")
    test = p.add_mutually_exclusive_group(required=True)
    test.add_argument("--test-source", help="a separate test source of the same kind (all of it is test)")
    test.add_argument("--n-test", type=int, help="hold out this many test images per class instead")
    p.add_argument("--test-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for opening --test-source (repeatable)")
    p.add_argument("--out", required=True, help="split directory to write")
    p.add_argument("--n1", type=int, required=True, help="labeled images of the head class")
    p.add_argument("--rho-l", type=ratio, required=True, help="labeled imbalance ratio ρ_l")
    p.add_argument("--m1", type=int, required=True, help="unlabeled images of class rank 0")
    p.add_argument("--rho-u", type=ratio, required=True, help="unlabeled ratio ρ_u (1: flat, <1: inverted)")
    p.add_argument("--n-val", type=int, required=True, help="balanced validation images per class")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--class-order", default=None,
                   help="classes from head to tail, comma-separated names or ids (default: label order)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split in --out")
    return p.parse_args(argv)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    source = open_source(args.kind, args.source, **dict(args.option))
    test_source = (open_source(args.kind, args.test_source, **dict(args.test_option))
                   if args.test_source else None)
    order = args.class_order.split(",") if args.class_order else None
    manifest = make_lt_split(source, args.out, n1=args.n1, rho_l=args.rho_l, m1=args.m1, rho_u=args.rho_u,
                             n_val=args.n_val, seed=args.seed, test_source=test_source,
                             n_test=args.n_test or 0, class_order=order, overwrite=args.overwrite)
    names, counts = manifest["class_names"], manifest["counts"]
    unlabeled = manifest["diagnostic"]["unlabeled_counts"]
    width = min(24, max(len(n) for n in names))
    print(f"{'rank':>4} {'class':<{width}} {'labeled':>8} {'unlabeled':>9} {'val':>6} {'test':>6}")
    for rank, label in enumerate(manifest["params"]["class_order"]):
        print(f"{rank:>4} {names[label][:width]:<{width}} {counts['labeled'][label]:>8} "
              f"{unlabeled[label]:>9} {counts['val'][label]:>6} {counts['test'][label]:>6}")
    totals = {name: entry["count"] for name, entry in manifest["lists"].items()}
    print(f"{'':>4} {'total':<{width}} {totals['labeled']:>8} {totals['unlabeled']:>9} {totals['val']:>6} "
          f"{totals['test']:>6}")
    print(f"split (seed {args.seed}) in {Path(args.out) / MANIFEST}: "
          + ", ".join(f"{name} {n}" for name, n in totals.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
