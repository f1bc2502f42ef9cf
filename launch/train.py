"""Fine-tune a classifier head with SelMix: frozen-backbone features in, a head that maximises a metric of the
confusion matrix (min recall, H-mean, ... see "objectives" below) out.

    python launch/train.py --config configs/cifar10_lt/min_recall.yaml       (one process, CPU or one GPU)
    python launch/train.py run.dir=runs/mine data.features=runs/mine/features data.split_dir=runs/mine/split
    accelerate launch launch/train.py --config C.yaml [section.key=value ...]  (every GPU of the node)
    python launch/train.py --help-config        (every config key with its default and documentation)

Settings come from the defaults, then --config, then section.key=value overrides (later wins).
"""

from __future__ import annotations

import sys
from pathlib import Path

from selmix_dist.cli import parser, run_cli

REPO = Path(__file__).resolve().parents[1]
# The keys a first run usually sets; --help shows them with their defaults, --help-config shows all.
COMMON_KEYS = ("run.dir", "data.features", "data.split_dir", "objective.name", "run.steps", "optim.lr",
               "optim.batch_size", "selmix.setting", "model.init_head", "run.resume")


def objectives_help() -> str:
    """Every registered objective with its hyper-parameter defaults and its one-line definition."""
    from selmix_dist.core import OBJECTIVES

    width = max(map(len, OBJECTIVES)) + 2
    lines = ["objectives (objective.name=NAME; hyper-parameters objective.params.KEY=VALUE, defaults shown):"]
    for name, cls in OBJECTIVES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        params = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items())
        lines.append(f"  {name:<{width}}{summary}")
        if params:
            lines.append(f"  {'':<{width}}params: {params}")
    return "\n".join(lines)


def common_keys_help() -> str:
    from selmix_dist.train.config import Config, all_keys

    default, docs = Config().to_dict(), all_keys()
    lines = ["common config keys (default):"]
    for key in COMMON_KEYS:
        section, name = key.split(".")
        lines.append(f"  {key}={default[section][name]!r}\n      {docs[key]}")
    return "\n".join(lines)


def shipped_configs_help() -> str:
    """The repository's training configs: YAML files made only of config sections (not the accelerate or
    tools/reproduce.py experiment files that live beside them)."""
    import dataclasses

    import yaml

    from selmix_dist.train.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    files = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and raw and set(raw) <= sections:
            files.append(path.relative_to(REPO).as_posix())
    return "training configs in this repository (--config):\n" + "\n".join(f"  {f}" for f in files)


def run(argv: list[str]) -> int:
    # Signals are handled from the first moment: a SIGUSR1 during set-up must not kill the job.
    from selmix_dist.train.preemption import Preemption

    preemption = Preemption(requeue=False).install()
    p = parser(__doc__, epilog="\n\n".join([common_keys_help(), objectives_help(), shipped_configs_help()]))
    p.add_argument("--config", help="YAML experiment config (default: none, only the defaults and overrides)")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key with its default and documentation, then the objectives, and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.steps=3000 optim.lr=3e-3")
    args = p.parse_args(argv)
    from selmix_dist.train.config import describe, load_config

    if args.help_config:
        print(describe())
        print()
        print(objectives_help())
        return 0
    from selmix_dist.report import report_finished_run
    from selmix_dist.train.entry import train

    cfg = load_config(args.config, args.overrides)
    preemption.requeue_enabled = cfg.run.requeue
    report_finished_run(cfg.run.dir, train(cfg, preemption))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
