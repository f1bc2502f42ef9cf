"""Write an image source, or one list of a split directory, as webdataset shards (<key>.jpg|png + <key>.cls).

    python tools/make_shards.py --kind imagefolder --source data/cifar10/train --out runs/shards/train \
        --maxcount 5000 --world-size 8 --workers 4
    python tools/make_shards.py --split-dir runs/splits/cifar10_lt --split labeled --out runs/shards/labeled

Stored JPEG/PNG bytes are copied unchanged; other images are encoded as PNG (or JPEG with --reencode jpg).
Warns when there are fewer shards than --world-size × --workers (data-loader workers per rank).
"""

from __future__ import annotations

import sys

from selmix_dist.cli import key_value, parser, run_cli
from selmix_dist.data.shards import shard_count_warning, write_shards
from selmix_dist.data.sources import SOURCE_KINDS, open_source
from selmix_dist.data.splits import SPLIT_NAMES, load_split, open_split_source


def parse_args(argv: list[str] | None = None):
    p = parser(__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", help="an image source to write whole (with --kind)")
    where.add_argument("--split-dir", help="a split directory of tools/make_lt_split.py (with --split)")
    p.add_argument("--kind", choices=sorted(SOURCE_KINDS), help="kind of --source")
    p.add_argument("--option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for opening --source, e.g. split=train of a Hugging Face DatasetDict (repeatable)")
    p.add_argument("--split", choices=SPLIT_NAMES, help="which list of --split-dir to write")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    p.add_argument("--world-size", type=int, default=1, help="ranks that will read the shards")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers per rank")
    p.add_argument("--prefix", default="shard", help="shard file names are <prefix>-NNNNNN.tar")
    p.add_argument("--reencode", choices=["png", "jpg"], default="png",
                   help="format for images that have no stored JPEG/PNG bytes")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = p.parse_args(argv)
    if args.source is not None and args.kind is None:
        p.error("--source needs --kind")
    if args.split_dir is not None and args.split is None:
        p.error("--split-dir needs --split")
    if args.option and args.source is None:
        p.error("--option applies to --source (a split directory reopens its sources as recorded)")
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.source is not None:
        source, indices, labels = open_source(args.kind, args.source, **dict(args.option)), None, None
    else:
        source = open_split_source(args.split_dir, args.split)
        split = load_split(args.split_dir, args.split, source)
        indices, labels = split.items, split.labels
    shards = write_shards(source, args.out, args.maxcount, indices=indices, labels=labels,
                          world_size=args.world_size, workers=args.workers, prefix=args.prefix,
                          reencode=args.reencode, overwrite=args.overwrite)  # warns on too few shards
    total = len(source) if indices is None else len(indices)
    print(f"wrote {total} samples in {len(shards)} shard(s) to {args.out} "
          f"({shards[0].name} … {shards[-1].name}, at most {args.maxcount} each)")
    message = shard_count_warning(len(shards), total, args.world_size, args.workers)
    if message:
        print(f"WARNING: {message}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
