"""Set-up pieces of a run: the start head, optimizer and schedule, and the run's descriptive files."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from selmix_dist import distributed as dist
from selmix_dist.core.schedule import LrSchedule
from selmix_dist.heads._inputs import param_groups
from selmix_dist.heads.start import (
    AUTO,
    FITTED,
    fit_start_head,
    read_head,
    self_training_rows,
    zero_head,
)
from selmix_dist.train.config import config_yaml

if TYPE_CHECKING:
    from selmix_dist.train.trainer import Trainer

log = logging.getLogger(__name__)


def check_data(cfg, data) -> None:
    """Boundary checks of the data against the config, before any work."""
    data.validate(cfg.data.num_classes)
    if cfg.selmix.setting == "semi" and (data.partners is None or len(data.partners) == 0):
        raise ValueError(f"selmix.setting=semi draws partners from the unlabeled split '{cfg.data.unlabeled_split}', "
                         "which is missing or empty")


def start_head(trainer: Trainer, given: torch.nn.Linear | None) -> torch.nn.Linear:
    """The head the run starts from: a checkpoint's shape (its weights load later), `given`, or model.init_head.

    A fitted head is fitted once, on rank 0, and cached as run.dir/init_head.pt for the other ranks.
    """
    cfg, data, k = trainer.cfg, trainer.data, trainer.k
    d = data.labeled.num_features
    if trainer.plan.state is not None:
        return torch.nn.Linear(d, k)
    if given is not None:
        if given.weight.shape != (k, d):
            raise ValueError(f"starting head has shape {tuple(given.weight.shape)}, expected ({k}, {d})")
        return given
    spec = cfg.model.init_head
    if spec == "zeros":
        return zero_head(d, k)
    if spec not in (*FITTED, AUTO):
        return read_head(spec, d, k)
    cached = trainer.run_dir / "init_head.pt"
    if trainer.run_dir.main and not cached.exists():
        head = _fit_start(trainer, spec)
        trainer.run_dir.torch_save(head.state_dict(), cached)
    dist.barrier()
    return read_head(cached, d, k)


def _fit_start(trainer: Trainer, spec: str) -> torch.nn.Linear:
    """model.init_head ∈ FITTED or 'auto', fitted on this rank (the other ranks read the cached file)."""
    cfg, data = trainer.cfg, trainer.data
    if spec == AUTO:  # the paper's start (README, "Defaults that hold": the start-head study)
        spec = "fixmatch_la" if cfg.selmix.setting == "semi" else "la"
    lab = data.labeled
    log.info("fitting the start head (model.init_head=%s) on %d labeled features", spec, len(lab))
    unlabeled = self_training_rows(data.partners, cfg.run.seed) if spec == "fixmatch_la" else None
    return fit_start_head(spec, lab.take(torch.arange(len(lab))), lab.labels, trainer.k, unlabeled=unlabeled,
                          weight_decay=cfg.optim.weight_decay, steps=cfg.model.init_head_steps, seed=cfg.run.seed)


def build_head_and_optimizer(trainer: Trainer, given: torch.nn.Linear | None):
    """(head, SGD optimizer, LambdaLR over an LrSchedule); weight decay on the weight only (method doc §4.4)."""
    cfg = trainer.cfg
    head = start_head(trainer, given)
    optimizer = torch.optim.SGD(param_groups(head, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum)
    schedule = LrSchedule(cfg.run.steps, cfg.optim.warmup_steps, constant=cfg.optim.schedule == "constant")
    return head, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def backbone_record(cfg) -> dict:
    """What produced the features: the cache's key (model, weights sha256, transform, dtype) and backbone spec in
    mode 'features', the configured model in mode 'online' (stored in best.pt so that a head names its backbone)."""
    if cfg.model.mode == "online":
        return {"model": cfg.model.backbone, "weights": cfg.model.weights, "image_size": cfg.model.image_size}
    from selmix_dist.features.cache import read_manifest

    manifest = read_manifest(cfg.data.features)
    return {**manifest["key"], "spec": manifest.get("backbone")}


def write_run_files(trainer: Trainer) -> None:
    """config.yaml (what runs now) and meta.json (what the report and the exported model need)."""
    data, run_dir = trainer.data, trainer.run_dir
    run_dir.write_text("config.yaml", config_yaml(trainer.cfg))
    run_dir.write_json("meta.json", {
        "class_names": data.class_names or [str(i) for i in range(trainer.k)],
        "train_class_counts": data.train_class_counts().tolist(),
        "objective": trainer.cfg.objective.name, "target_metric": trainer.objective.target_metric,
        "num_classes": trainer.k, "world_size": trainer.world})
