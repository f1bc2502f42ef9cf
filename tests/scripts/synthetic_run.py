"""Run the trainer on a seeded synthetic long-tailed feature set (used by the trainer tests).

    python tests/scripts/synthetic_run.py RUN_DIR [--kill-at STEP] [--signal-at STEP] [--dump-refresh FILE]
        [--slow-val SECONDS] [--cache DIR] [section.key=value ...]
Works under `accelerate launch` too. --kill-at sends SIGKILL to this process right after that training
step (a crash at an arbitrary step); --signal-at sends SIGUSR1 (what SLURM sends before the time limit);
--dump-refresh runs only the first refresh and saves what it decided (per rank); --slow-val makes every
validation batch take that long (a long refresh, to signal into); --cache reads the same rows from a
feature cache that `write_synthetic_cache` wrote (the trainer's reader instead of in-memory tensors).
Faults enter through the trainer's public hooks, never by replacing its methods.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch

from selmix_dist import distributed as dist
from selmix_dist.config import load_config
from selmix_dist.data.synthetic import class_means, gaussian_features, long_tailed_class_counts
from selmix_dist.features.reader import open_features
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.report import report_finished_run
from selmix_dist.train.monitor import setup_logging
from selmix_dist.train.preemption import Preemption
from selmix_dist.train.trainer import Trainer


def synthetic_data(num_classes: int = 6, dim: int = 16, seed: int = 0) -> TrainData:
    means = class_means(num_classes, dim, seed, separation=2.0)
    lab = gaussian_features(long_tailed_class_counts(60, 10, num_classes), means, seed, "labeled", noise=1.5)
    unl = gaussian_features(long_tailed_class_counts(120, 10, num_classes), means, seed, "unlabeled", noise=1.5)
    val = gaussian_features(torch.full((num_classes,), 25), means, seed, "val", noise=1.5)
    test = gaussian_features(torch.full((num_classes,), 40), means, seed, "test", noise=1.5)
    return TrainData(labeled=FeatureSet(*lab, "labeled"), partners=FeatureSet(unl[0], -torch.ones_like(unl[1]),
                     "unlabeled"), val=FeatureSet(*val, "val"), test=FeatureSet(*test, "test"))


SPLITS = {"labeled": "labeled", "unlabeled": "partners", "val": "val", "test": "test"}  # cache split: field


def write_synthetic_cache(cache_dir, num_classes: int = 6) -> None:
    """The synthetic splits as a float32 feature cache (exact copies of the rows) in small chunks."""
    from helpers.feature_cache import write_feature_cache

    data = synthetic_data(num_classes)
    for split, field in SPLITS.items():
        fs = getattr(data, field)
        write_feature_cache(cache_dir, split, fs.labels, lambda pos, fs=fs: fs.features[pos], fs.num_features,
                            dtype="float32", chunk_size=64)


def cached_data(cache_dir) -> TrainData:
    """The synthetic splits read through the trainer's cache reader."""
    sets = {}
    for split, field in SPLITS.items():
        reader = open_features(cache_dir, split)
        sets[field] = FeatureSet(reader, reader.labels, "unlabeled" if split == "unlabeled" else split)
    return TrainData(**sets)


class SlowFeatureSet(FeatureSet):
    """A feature set whose every read sleeps (a stand-in for a huge validation split)."""

    def __init__(self, fs: FeatureSet, seconds: float):
        super().__init__(fs.features, fs.labels, fs.name)
        self.seconds = seconds

    def take(self, index, *, augment_seed=None):
        time.sleep(self.seconds)
        return super().take(index, augment_seed=augment_seed)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--signal-at", type=int, default=-1)
    p.add_argument("--dump-refresh", default="")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--slow-val", type=float, default=0.0)
    p.add_argument("--setup-sleep", type=float, default=0.0)
    p.add_argument("--cache", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    preemption = Preemption(requeue=False).install()  # from process start, as launch/train.py does
    cfg = load_config(None, [f"run.dir={args.run_dir}", "log.progress=false", *args.overrides])
    preemption.requeue_enabled = cfg.run.requeue
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # before init
    setup_logging(rank)
    pid_dir = os.path.join(args.run_dir + ".pids")
    os.makedirs(pid_dir, exist_ok=True)
    with open(os.path.join(pid_dir, f"rank{rank}"), "w") as fh:  # for tests that signal the workers
        fh.write(str(os.getpid()))
    time.sleep(args.setup_sleep)

    def faults(trainer: Trainer) -> None:
        if trainer.step == args.kill_at and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.step == args.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    data = cached_data(args.cache) if args.cache else synthetic_data(args.classes)
    if args.slow_val:
        data.val = SlowFeatureSet(data.val, args.slow_val)
    trainer = Trainer(cfg, data, hooks=[faults], preemption=preemption)
    if args.dump_refresh:
        record = trainer.refresher.refresh(trainer.plain_head(), trainer.step, lambda: False)
        r = record.result
        torch.save({"counts": record.counts, "joint": r.joint, "prototypes": r.prototypes, "P": r.distribution,
                    "G": r.gain, "partner_labels": record.partner_labels}, f"{args.dump_refresh}.rank{rank}")
        trainer.close()
        return
    summary = trainer.run()
    if dist.is_main_process():
        head = trainer.plain_head()
        torch.save({"summary": summary, "distributed_type": trainer.acc.distributed_type.name,
                    "world_size": dist.world_info()[1], "weight": head.weight.detach().clone(),
                    "bias": head.bias.detach().clone()}, os.path.join(args.run_dir, "final_head.pt"))
    trainer.close()
    report_finished_run(args.run_dir, summary)  # what launch/train.py does after train()


if __name__ == "__main__":
    main()
