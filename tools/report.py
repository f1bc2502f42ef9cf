"""Write report.json / report.csv / report.md and plots for a training run directory.

    python tools/report.py RUN_DIR
"""

from __future__ import annotations

import argparse
import sys

from selmix_dist.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory written by the trainer")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.run_dir}/report.md  (best step {report['best_step']}, target {report['target_metric']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
