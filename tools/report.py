"""Write report.json / report.csv / report.md and plots for a training run directory.

    python tools/report.py RUN_DIR
"""

from __future__ import annotations

import sys

from selmix_dist.cli import parser, run_cli
from selmix_dist.report import write_report


def run(argv: list[str]) -> int:
    p = parser(__doc__)
    p.add_argument("run_dir", help="run directory written by the trainer")
    args = p.parse_args(argv)
    report = write_report(args.run_dir)
    print(f"{args.run_dir}/report.md  (best step {report['best_step']}, target {report['target_metric']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
