"""Fine-tune a classifier head with SelMix.

    accelerate launch launch/train.py --config configs/cifar10_lt/min_recall.yaml [section.key=value ...]
    python launch/train.py --config ... (one process, CPU or GPU)
    python launch/train.py --help-config (every key with its default and documentation)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config")
    parser.add_argument("--help-config", action="store_true", help="print every config key and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    from selmix_dist.train.config import describe, load_config

    if args.help_config:
        print(describe())
        return 0
    from selmix_dist.train.entry import train

    train(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
