"""Post-hoc plug-in on an exported classifier: per-class log-weights tuned on a validation split list for a metric,
written as a new export whose classifier bias is b + log g (docs/method.md §6.1).

    python tools/plugin.py runs/mine/classifier runs/mine/split/val.txt --objective min_recall \\
        --out runs/mine/classifier_plugin [--root DIR] [--param omega=50] [--head-list runs/mine/split/labeled.txt]

The split list holds `relative/path label` lines (paths relative to --root, default the list's folder). The new
export loads like any other (`tools/predict.py`, `selmix_dist.load_classifier`); its selmix_export.json records the
weights and their validation metrics. Head/tail objectives need --head-list, a split list whose class counts decide
the head classes (the training list: the most frequent classes, data.head_fraction of them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from selmix_dist.classifier import load_classifier, predict_probabilities, write_plugin_export
from selmix_dist.cli import key_value, parser, run_cli
from selmix_dist.core import OBJECTIVES, build_objective, head_tail_masks
from selmix_dist.core.plugin import fit_plugin
from selmix_dist.data.sources import read_list_file


def head_mask(head_list: str | None, class_names: list[str], fraction: float) -> torch.Tensor | None:
    """bool[K] head classes from the class counts of a split list (None without one)."""
    if head_list is None:
        return None
    _, labels = read_list_file(head_list, class_names)
    counts = torch.bincount(torch.as_tensor(labels), minlength=len(class_names))
    return head_tail_masks(counts, head_fraction=fraction)[0]


def run(argv: list[str]) -> int:
    p = parser(__doc__)
    p.add_argument("classifier", help="export folder (tools/export.py or an earlier tools/plugin.py)")
    p.add_argument("val_list", help="validation split list (.txt of `relative/path label` lines)")
    p.add_argument("--objective", required=True, choices=sorted(OBJECTIVES), help="metric to tune the weights for")
    p.add_argument("--param", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="objective parameter (repeatable), e.g. --param alpha=0.95")
    p.add_argument("--out", required=True, help="new export folder (new, empty, or an earlier export)")
    p.add_argument("--root", default=None, help="folder the list's paths are relative to")
    p.add_argument("--head-list", default=None, help="split list whose class counts decide the head classes")
    p.add_argument("--head-fraction", type=float, default=0.9, help="fraction of classes in the head")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    model, transform, class_names = load_classifier(args.classifier)
    items, labels = read_list_file(args.val_list, class_names)
    k = len(class_names)
    bad = [(item, int(label)) for item, label in zip(items, labels.tolist(), strict=True) if not 0 <= label < k]
    if bad:
        raise ValueError(f"{args.val_list}: label {bad[0][1]} of {bad[0][0]!r} is outside [0, {k})")
    base = Path(args.root) if args.root is not None else Path(args.val_list).parent
    images = [str(base / item) for item in items]
    logits, failed = predict_probabilities(model, transform, images, logits=True,
                                           batch_size=args.batch_size, device=args.device,
                                           progress=not args.no_progress)
    if failed:   # a tuned weight must not silently depend on which images happened to decode
        for i in sorted(failed):
            print(f"error: {failed[i]}", file=sys.stderr)
        raise ValueError(f"{len(failed)} of {len(images)} validation images could not be read (listed above); "
                         f"fix or remove them from {args.val_list}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    mask = head_mask(args.head_list, class_names, args.head_fraction)
    objective = build_objective(args.objective, k, head=mask, **dict(args.param))
    result = fit_plugin(logits, labels, objective, head=mask)
    record = {"objective": args.objective, "params": objective.params, "val_list": args.val_list,
              "log_weights": result.log_weights.tolist(), "val": result.metrics, "val_score": list(result.score),
              "start_val_score": list(result.start_score)}
    write_plugin_export(args.classifier, args.out, result.log_weights, record)
    target = objective.target_metric
    print(f"plug-in for {args.objective} on {len(images)} validation images: {target} "
          f"{result.start_score[1]:.4f} → {result.score[1]:.4f}"
          + ("" if result.feasible else f" (constraint missed by {-result.score[0]:.4g})") + f"; wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
