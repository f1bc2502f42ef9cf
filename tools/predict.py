"""Top-k class predictions of a SelMix classifier (an export folder or a run directory) on image files.

    python tools/predict.py runs/demo/classifier photo.jpg more_photos/ [--top-k 5] [--json | --csv]
    python tools/predict.py RUN_DIR split/test.txt --root data/cifar10 --which last --csv > predictions.csv

IMAGES are image files, folders (searched recursively for .jpg/.jpeg/.png, sorted), or split lists (`.txt`
files of `relative/path label` lines, paths relative to --root, default the list's folder; the label, an
index or a class name, is reported as "label"). Images go through the classifier's eval transform in
batches; a progress bar goes to stderr. Output: a text table (default), a JSON list, or CSV.

An image that is missing or cannot be decoded gets no row: it is reported as an `error:` line on stderr, the
other images are still predicted, and the exit code is then 2.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import torch

from selmix_dist.classifier import WHICH, load_classifier, predict_probabilities
from selmix_dist.cli import parser, run_cli
from selmix_dist.data.sources import IMAGE_EXTENSIONS, read_list_file

LIST_SUFFIX = ".txt"


def collect_images(inputs: list[str], root: str | None, class_names: list[str]) -> list[tuple[str, str | None]]:
    """(image path, true class name or None) for every input, in the order given."""
    found: list[tuple[str, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(str(Path(d) / f) for d, dirs, names in os.walk(path) for f in names
                           if f[0] != "." and f.lower().endswith(IMAGE_EXTENSIONS)
                           and not any(part.startswith(".") for part in Path(d).relative_to(path).parts))
            if not files:
                raise FileNotFoundError(f"folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} image")
            found += [(f, None) for f in files]
        elif not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        elif path.suffix.lower() == LIST_SUFFIX:
            items, labels = read_list_file(path, class_names)
            base = Path(root) if root is not None else path.parent
            for rel, label in zip(items, labels.tolist(), strict=True):
                if not 0 <= label < len(class_names):
                    raise ValueError(f"{path}: label {label} of {rel!r} is outside [0, {len(class_names)})")
                found.append((str(base / rel), class_names[label]))
        else:
            found.append((str(path), None))
    return found


def top_k_rows(images: list[tuple[str, str | None]], probs: torch.Tensor, class_names: list[str],
               k: int) -> list[dict]:
    """One {"image", "label", "top_k": [{"class", "index", "probability"}, ...]} per image, best first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [{"image": path, "label": label,
             "top_k": [{"class": class_names[i], "index": i, "probability": p}
                       for p, i in zip(vals.tolist(), idx.tolist(), strict=True)]}
            for (path, label), vals, idx in zip(images, values, indices, strict=True)]


def write_csv(rows: list[dict], k: int, out) -> None:
    """Columns image, label, class_1, probability_1, ..., class_k, probability_k."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "label"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("class", "probability")])
    for row in rows:
        cells = [c for t in row["top_k"] for c in (t["class"], repr(t["probability"]))]
        writer.writerow([row["image"], row["label"] or "", *cells])


def write_text(rows: list[dict], out) -> None:
    width = max((len(r["image"]) for r in rows), default=0)
    for row in rows:
        top = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top_k"])
        label = f"  (label {row['label']})" if row["label"] is not None else ""
        out.write(f"{row['image']:<{width}}  {top}{label}\n")


def run(argv: list[str]) -> int:
    p = parser(__doc__)
    p.add_argument("classifier", help="export folder (tools/export.py) or training run directory")
    p.add_argument("images", nargs="+", help="image files, folders, or .txt split lists")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (at most K)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    p.add_argument("--root", default=None, help="folder that split-list paths are relative to")
    p.add_argument("--which", choices=WHICH, default="best", help="checkpoint of a run directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be >= 1")
    model, transform, class_names = load_classifier(args.classifier, args.which)
    images = collect_images(args.images, args.root, class_names)
    probs, failed = predict_probabilities(model, transform, [path for path, _ in images],
                                          batch_size=args.batch_size, num_workers=args.num_workers,
                                          device=args.device, progress=not args.no_progress)
    read = [i for i in range(len(images)) if i not in failed]
    rows = top_k_rows([images[i] for i in read], probs[read], class_names, args.top_k)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.csv:
        write_csv(rows, min(args.top_k, len(class_names)), sys.stdout)
    else:
        write_text(rows, sys.stdout)
    for i in sorted(failed):
        print(f"error: {failed[i]}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(images)} images could not be read (listed above); the other "
              f"{len(rows)} were predicted", file=sys.stderr)
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
