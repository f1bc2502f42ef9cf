"""`train(cfg)`: the pipeline of one run — signals, threads, data, trainer.

    config → features (cached or online) → Trainer (resume or start head) → loop → checkpoint

The report is the caller's next step (`selmix_dist.report.report_finished_run`, as launch/train.py does):
training never depends on it, and its failure never fails or alters a finished run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from selmix_dist import distributed as dist
from selmix_dist.config import Config
from selmix_dist.features.load import train_data
from selmix_dist.train.monitor import setup_logging
from selmix_dist.train.preemption import Preemption
from selmix_dist.train.trainer import Trainer

log = logging.getLogger(__name__)


def cpu_threads() -> int:
    """Threads per process that do not oversubscribe the CPU: an explicit OMP_NUM_THREADS wins, else the
    cores shared evenly by the processes of this node (torch's default of all cores per process made a
    two-process run several times slower on a 2-core machine)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local_world)


def train(cfg: Config, preemption: Preemption | None = None) -> dict[str, Any]:
    """Run one SelMix fine-tuning job as configured; returns the trainer's summary."""
    preemption = preemption or Preemption(cfg.run.requeue).install()
    threads = cpu_threads()
    torch.set_num_threads(threads)
    # accelerate's multi-CPU set-up otherwise applies its own count (physical cores per rank) with a warning.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    acc = dist.make_accelerator()
    rank, world = dist.world_info()
    setup_logging(rank)
    log.info("selmix_dist run %s: %s on %s, %d process(es), %d CPU thread(s) each", cfg.run.dir,
             cfg.objective.name, acc.device, world, torch.get_num_threads())
    try:
        log.info("loading %s (mode %s)", cfg.data.features or cfg.data.split_dir, cfg.model.mode)
        data = train_data(cfg, acc.device)
        trainer = Trainer(cfg, data, accelerator=acc, preemption=preemption)
        if not trainer.plan.complete:
            setup_logging(rank, trainer.run_dir / "train.log")
            trainer.run_dir.record(trainer.run_dir / "train.log")
        summary = trainer.run()
    except BaseException:
        acc.end_training()  # no barrier here: the other ranks may not be coming
        raise
    trainer.close()
    return summary
