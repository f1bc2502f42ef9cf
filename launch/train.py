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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    # Signals are handled from the first moment: a SIGUSR1 during set-up must not kill the job.
    from selmix_dist.train.preemption import Preemption

    preemption = Preemption(requeue=False).install()
    from selmix_dist.train.config import describe, load_config

    if args.help_config:
        print(describe())
        return 0
    from selmix_dist.train.entry import train

    try:
        cfg = load_config(args.config, args.overrides)
        preemption.requeue_enabled = cfg.run.requeue
        train(cfg, preemption)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if args.debug or not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


def _is_user_error(err: BaseException) -> bool:
    """Config, data and path problems the user can act on (not bugs, which keep their traceback)."""
    from selmix_dist.train.lock import RunLockedError

    return isinstance(err, (ValueError, FileNotFoundError, RunLockedError))


if __name__ == "__main__":
    sys.exit(main())
