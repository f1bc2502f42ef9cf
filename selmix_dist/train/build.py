"""Set-up pieces of a run: the start head, optimizer and schedule, and the run's descriptive files.

Each piece is built from the config sections and objects it needs; the trainer owns what they build, and
nothing here knows the trainer.
"""

from __future__ import annotations

import logging

import torch

from selmix_dist import distributed as dist
from selmix_dist.config import Config, OptimConfig, config_yaml
from selmix_dist.core.schedule import LrSchedule
from selmix_dist.features.sets import TrainData
from selmix_dist.heads._inputs import param_groups
from selmix_dist.heads.start import (
    AUTO,
    FITTED,
    fit_start_head,
    read_head,
    self_training_rows,
    zero_head,
)
from selmix_dist.train.rundir import RunDir

log = logging.getLogger(__name__)


def check_data(cfg: Config, data: TrainData) -> None:
    """Boundary checks of the data against the config, before any work."""
    data.validate(cfg.data.num_classes)
    if cfg.selmix.setting == "semi" and (data.partners is None or len(data.partners) == 0):
        raise ValueError(f"selmix.setting=semi draws partners from the unlabeled split '{cfg.data.unlabeled_split}', "
                         "which is missing or empty")
    rows = len(data.labeled)
    if cfg.optim.batch_size > rows:  # pairs are drawn with replacement: a larger batch only repeats rows
        raise ValueError(f"config key 'optim.batch_size' ({cfg.optim.batch_size} pairs per step and rank) exceeds the "
                         f"{rows} rows of the labeled split '{cfg.data.labeled_split}': each pair's labeled row is "
                         f"drawn with replacement, so every row would repeat about {cfg.optim.batch_size / rows:.0f} "
                         f"times in each step, at that batch's cost; use at most {rows}")


def start_head(cfg: Config, data: TrainData, run_dir: RunDir, given: torch.nn.Linear | None) -> torch.nn.Linear:
    """The head a fresh run starts from, Linear(d → K): `given`, or model.init_head.

    A fitted head is fitted once, on rank 0, and cached as run.dir/init_head.pt for the other ranks.
    """
    k, d = data.num_classes, data.labeled.num_features
    if given is not None:
        if given.weight.shape != (k, d):
            raise ValueError(f"starting head has shape {tuple(given.weight.shape)}, expected ({k}, {d})")
        return given
    spec = cfg.model.init_head
    if spec == "zeros":
        return zero_head(d, k)
    if spec not in (*FITTED, AUTO):
        return read_head(spec, d, k)
    cached = run_dir / "init_head.pt"
    if run_dir.main and not cached.exists():
        head = _fit_start(cfg, data, spec)
        run_dir.torch_save(head.state_dict(), cached)
    dist.barrier()
    return read_head(cached, d, k)


def _fit_start(cfg: Config, data: TrainData, spec: str) -> torch.nn.Linear:
    """model.init_head ∈ FITTED or 'auto', fitted on this rank (the other ranks read the cached file)."""
    if spec == AUTO:  # the paper's start (docs/defaults.md: the start-head study)
        spec = "fixmatch_la" if cfg.selmix.setting == "semi" else "la"
    lab = data.labeled
    log.info("fitting the start head (model.init_head=%s) on %d labeled features", spec, len(lab))
    unlabeled = self_training_rows(data.partners, cfg.run.seed) if spec == "fixmatch_la" else None
    return fit_start_head(spec, lab.take(torch.arange(len(lab))), lab.labels, data.num_classes, unlabeled=unlabeled,
                          weight_decay=cfg.optim.weight_decay, steps=cfg.model.init_head_steps, seed=cfg.run.seed)


def build_optimizer(head: torch.nn.Linear, optim: OptimConfig) -> torch.optim.SGD:
    """SGD on the head; weight decay on the weight only (docs/method.md §5.4)."""
    return torch.optim.SGD(param_groups(head, optim.weight_decay), lr=optim.lr, momentum=optim.momentum)


class RunSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The lr schedule of a run of `total_steps` steps: LambdaLR over an `LrSchedule` built here, from the config.

    Its state dict holds the step counters only, never the schedule: LambdaLR would save the LrSchedule's
    fields and a resume would bring back the old run.steps, so a run extended to more steps
    (run.extend_steps) runs the schedule it was built with, re-stretched over the new total.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
        super().__init__(optimizer, LrSchedule(total_steps, optim.warmup_steps, constant=optim.schedule == "constant"))

    def lr_sum(self, start: int, stop: int) -> float:
        """The learning rates of steps start … stop − 1 summed (the gain forecast's step size, core.forecast)."""
        return self.base_lrs[0] * sum(self.lr_lambdas[0](t) for t in range(start, stop))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lr_lambdas": [None] * len(self.lr_lambdas)}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints written before this class hold the LrSchedule's fields under lr_lambdas: never restored.
        super().load_state_dict({**state, "lr_lambdas": [None] * len(self.lr_lambdas)})


def backbone_record(cfg: Config) -> dict:
    """What produced the features: the cache's key (model, weights sha256, transform, dtype) and backbone spec in
    mode 'features', the configured model in mode 'online' (stored in best.pt so that a head names its backbone)."""
    if cfg.model.mode == "online":
        return {"model": cfg.model.backbone, "weights": cfg.model.weights, "image_size": cfg.model.image_size}
    from selmix_dist.features.cache import read_manifest

    manifest = read_manifest(cfg.data.features)
    return {**manifest["key"], "spec": manifest.get("backbone")}


def write_run_files(run_dir: RunDir, cfg: Config, data: TrainData, *, target_metric: str, world_size: int) -> None:
    """config.yaml (what runs now) and meta.json (what the report and the exported model need)."""
    k = data.num_classes
    run_dir.write_text("config.yaml", config_yaml(cfg))
    run_dir.write_json("meta.json", {
        "class_names": data.class_names or [str(i) for i in range(k)],
        "train_class_counts": data.train_class_counts().tolist(),
        "objective": cfg.objective.name, "target_metric": target_metric,
        "num_classes": k, "world_size": world_size})
