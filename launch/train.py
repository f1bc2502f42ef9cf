"""Fine-tune a classifier head with SelMix: frozen-backbone features in, a head that maximises a metric of the
confusion matrix (min recall, H-mean, ... see "objectives" below) out.

    python launch/train.py --config configs/cifar10_lt/min_recall.yaml       (one process, CPU or one GPU)
    python launch/train.py run.dir=runs/mine data.features=runs/mine/features data.split_dir=runs/mine/split
    accelerate launch launch/train.py --config C.yaml [section.key=value ...]  (every GPU of the node)
    python launch/train.py --nproc-per-node 2 --config C.yaml   (2 ranks forked from this process: they share
                                                                 its memory; on more nodes add --nnodes,
                                                                 --node-rank and --master-addr, one call a node)
    python launch/train.py --help-config        (every config key with its default and documentation)

Settings come from the defaults, then --config, then section.key=value overrides (later wins).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from selmix_dist.cli import DEBUG_FLAG, parser, run_cli

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
    from selmix_dist.config import Config, all_keys

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

    from selmix_dist.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    files = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and raw and set(raw) <= sections:
            files.append(path.relative_to(REPO).as_posix())
    return "training configs in this repository (--config):\n" + "\n".join(f"  {f}" for f in files)


def train_and_report(cfg, preemption) -> int:
    from selmix_dist.report import report_finished_run
    from selmix_dist.train.entry import train

    report_finished_run(cfg.run.dir, train(cfg, preemption))
    return 0


def forked_rank(cfg, debug: bool) -> int:
    """One rank of `--nproc-per-node`: signals handled from its first moment, errors reported as here."""
    from selmix_dist.train.preemption import Preemption

    preemption = Preemption(cfg.run.requeue).install()
    return run_cli(lambda _argv: train_and_report(cfg, preemption), [DEBUG_FLAG] if debug else [])


def run(argv: list[str], debug: bool = False) -> int:
    # Signals are handled from the first moment: a SIGUSR1 during set-up must not kill the job.
    from selmix_dist.train.preemption import Preemption

    preemption = Preemption(requeue=False).install()
    p = parser(__doc__, epilog="\n\n".join([common_keys_help(), objectives_help(), shipped_configs_help()]))
    p.add_argument("--config", help="YAML experiment config (default: none, only the defaults and overrides)")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key with its default and documentation, then the objectives, and exit")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="start N ranks on this node, forked from this process once it has imported torch and the "
                        "trainer, so that they share that memory (about 0.5 GB a rank; docs/benchmarks.md); for one "
                        "node, instead of accelerate launch")
    nodes = p.add_argument_group("several nodes with --nproc-per-node (as torchrun's; one call per node)")
    nodes.add_argument("--nnodes", type=int, default=1, metavar="N", help="number of nodes (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank, 0 … N−1")
    nodes.add_argument("--master-addr", default="", metavar="HOST", help="the host of node 0")
    nodes.add_argument("--master-port", type=int, default=29500, metavar="PORT",
                       help="the port node 0 listens on (default 29500)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.steps=3000 optim.lr=3e-3")
    args = p.parse_intermixed_args(argv)  # options may come between the overrides
    from selmix_dist.config import describe, load_config

    if args.help_config:
        print(describe())
        print()
        print(objectives_help())
        return 0
    if args.nproc_per_node is None and (args.nnodes != 1 or args.node_rank or args.master_addr):
        raise ValueError("--nnodes, --node-rank and --master-addr start forked ranks: give --nproc-per-node too")
    cfg = load_config(args.config, args.overrides)
    if args.nproc_per_node is None:
        preemption.requeue_enabled = cfg.run.requeue
        return train_and_report(cfg, preemption)
    from selmix_dist import distributed as dist
    from selmix_dist.train import entry  # noqa: F401 - imported once here, shared by the forked ranks

    preemption.uninstall()  # the launcher forwards SIGTERM to the ranks; each rank handles its signals
    return dist.launch_forked(forked_rank, args.nproc_per_node, cfg, debug, nnodes=args.nnodes,
                              node_rank=args.node_rank, master=f"{args.master_addr}:{args.master_port}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(functools.partial(run, debug=DEBUG_FLAG in argv), argv)


if __name__ == "__main__":
    sys.exit(main())
