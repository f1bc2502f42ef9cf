"""Export a run's SelMix classifier (frozen backbone + trained head) as one timm model folder.

    python tools/export.py runs/demo/selmix_min_recall --out runs/demo/classifier [--which best|last|plugin]

The folder loads offline as `timm.create_model("local-dir:DIR", pretrained=True)` (config.json with
label_names and the data config, model.safetensors) and carries selmix_export.json (run, step, objective,
validation / test metrics, backbone spec). A non-empty DIR that is not an earlier export is refused.
"""

from __future__ import annotations

import json

from selmix_dist.classifier import WHICH, export_classifier
from selmix_dist.cli import parser, run_cli


def run(argv: list[str]) -> int:
    p = parser(__doc__)
    p.add_argument("run_dir", help="training run directory (checkpoints/, config.yaml, meta.json)")
    p.add_argument("--out", required=True, help="export folder (new, empty, or an earlier export)")
    p.add_argument("--which", choices=WHICH, default="best",
                   help="best: checkpoints/best.pt (max validation target metric); last: newest step checkpoint; "
                        "plugin: checkpoints/plugin.pt (a run trained with plugin.enabled=true)")
    p.add_argument("--json", action="store_true", help="print selmix_export.json instead of a summary")
    args = p.parse_args(argv)
    meta = export_classifier(args.run_dir, args.out, args.which)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    target = meta["target_metric"]
    print(f"exported {meta['which']} head of {meta['run_dir']} (step {meta['step']}, {meta['num_classes']} classes, "
          f"backbone {meta['backbone']['model']} at {meta['backbone']['image_size']} px) to {args.out}")
    for split, entry in meta["metrics"].items():
        if entry is not None and target in entry["metrics"]:
            print(f"  {split} {target} at step {entry['step']}: {entry['metrics'][target]:.4f}")
    print(f'load: timm.create_model("local-dir:{args.out}", pretrained=True) or '
          f'selmix_dist.load_classifier("{args.out}")')
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
