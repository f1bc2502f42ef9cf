"""Run the trainer on a seeded synthetic long-tailed feature set (used by the trainer tests).

    python tests/scripts/synthetic_run.py RUN_DIR [--kill-at STEP] [--signal-at STEP] [--dump-refresh FILE]
        [section.key=value ...]
Works under `accelerate launch` too. --kill-at sends SIGKILL to this process right after that training
step (a crash at an arbitrary step); --signal-at sends SIGUSR1 (what SLURM sends before the time limit);
--dump-refresh runs only the first refresh and saves what it decided (per rank).
"""

from __future__ import annotations

import argparse
import os
import signal

import torch

from selmix_dist import distributed as dist
from selmix_dist.data.synthetic import class_means, gaussian_features, long_tailed_class_counts
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.train.config import load_config
from selmix_dist.train.trainer import Trainer


def synthetic_data(num_classes: int = 6, dim: int = 16, seed: int = 0) -> TrainData:
    means = class_means(num_classes, dim, seed, separation=2.0)
    lab = gaussian_features(long_tailed_class_counts(60, 10, num_classes), means, seed, "labeled", noise=1.5)
    unl = gaussian_features(long_tailed_class_counts(120, 10, num_classes), means, seed, "unlabeled", noise=1.5)
    val = gaussian_features(torch.full((num_classes,), 25), means, seed, "val", noise=1.5)
    test = gaussian_features(torch.full((num_classes,), 40), means, seed, "test", noise=1.5)
    return TrainData(labeled=FeatureSet(*lab, "labeled"), partners=FeatureSet(unl[0], -torch.ones_like(unl[1]),
                     "unlabeled"), val=FeatureSet(*val, "val"), test=FeatureSet(*test, "test"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--signal-at", type=int, default=-1)
    p.add_argument("--dump-refresh", default="")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    cfg = load_config(None, [f"run.dir={args.run_dir}", "log.progress=false", *args.overrides])
    trainer = Trainer(cfg, synthetic_data(args.classes))
    if args.dump_refresh:
        state = trainer.refresh()
        rank, _ = dist.world_info()
        torch.save({"counts": state.counts, "prototypes": state.prototypes, "P": state.distribution,
                    "G": state.gain, "partner_labels": state.partner_labels}, f"{args.dump_refresh}.rank{rank}")
        trainer.close()
        return
    step_fn = trainer.train_step

    def hooked_step() -> float:
        loss = step_fn()
        if trainer.step + 1 == args.kill_at and dist.world_info()[0] == dist.world_info()[1] - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if trainer.step + 1 == args.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    trainer.train_step = hooked_step
    summary = trainer.run()
    if dist.is_main_process():
        head = trainer.acc.unwrap_model(trainer.head)
        torch.save({"summary": summary, "distributed_type": trainer.acc.distributed_type.name,
                    "world_size": dist.world_info()[1], "weight": head.weight.detach().clone(),
                    "bias": head.bias.detach().clone()}, os.path.join(args.run_dir, "final_head.pt"))
    trainer.close()


if __name__ == "__main__":
    main()
