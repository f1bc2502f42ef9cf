"""The SelMix fine-tuning loop (method doc §4), distributed through accelerate.

    refresh (every run.refresh_every steps) → draw pairs from P → mix features → SGD step on the head
    → log / poll for signals / checkpoint → … → final evaluation and checkpoint

Components, each owning one concern: `RunDir` (paths, manifest, lock), `Checkpointer` (find, verify, save,
prune), `Evaluator` (sharded passes), `Refresher` (C, pseudo-labels, G, P, sampler), `Monitor` (log,
TensorBoard, history), `Preemption` (signals, requeue); the start head comes from `heads.start`.
Each rank draws its own pairs with the (seed, rank, step) generator; accelerate synchronises gradients.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from selmix_dist import distributed as dist
from selmix_dist.core import GainConvergence, build_objective, head_tail_masks
from selmix_dist.core.rng import generator
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.heads.start import read_head
from selmix_dist.memory import map_large_blocks
from selmix_dist.train.build import backbone_record, build_head_and_optimizer, check_data, write_run_files
from selmix_dist.train.checkpointer import Checkpointer, NonFiniteStateError
from selmix_dist.train.config import Config, flatten
from selmix_dist.train.evaluator import Evaluator, Interrupted
from selmix_dist.train.monitor import Monitor
from selmix_dist.train.preemption import Preemption
from selmix_dist.train.refresher import Refresher, RefreshRecord
from selmix_dist.train.resume import ResumePlan, capture, plan_resume
from selmix_dist.train.rundir import RunDir

log = logging.getLogger(__name__)


class Trainer:
    """One SelMix run: `Trainer(cfg, data).run()`, then `close()` on every rank.

    `hooks` are called as `hook(trainer)` after every training step (fault injection in tests, custom
    logging); `preemption` is the process's handler when the entry point installed one at start-up.
    """

    def __init__(self, cfg: Config, data: TrainData, accelerator=None, init_head: torch.nn.Linear | None = None,
                 hooks: Sequence[Callable[[Trainer], None]] = (), preemption: Preemption | None = None):
        self.cfg, self.data, self.hooks = cfg, data, list(hooks)
        check_data(cfg, data)
        map_large_blocks()  # the passes' large buffers must not settle in this rank's heap (selmix_dist.memory)
        self.acc = accelerator or dist.make_accelerator()
        self.rank, self.world = dist.world_info()
        self.k = data.num_classes
        self.preemption = preemption or Preemption(cfg.run.requeue).install()
        self.run_dir = RunDir(cfg.run.dir, main=dist.is_main_process(), lock_stale_seconds=cfg.run.lock_stale_seconds)
        self.checkpointer = Checkpointer(self.run_dir, cfg.run.keep_checkpoints)
        train_counts = data.train_class_counts()
        head_mask, _ = head_tail_masks(train_counts, head_fraction=cfg.data.head_fraction)
        self.class_order = torch.argsort(train_counts, descending=True, stable=True)  # heatmaps: head first
        self.evaluator = Evaluator(self.k, cfg.data.eval_batch_size, self.acc.device, head_mask)
        self.objective = build_objective(cfg.objective.name, self.k, head=head_mask,
                                         head_fraction=cfg.data.head_fraction, **cfg.objective.active())
        # Also the run's max-gain history (checkpointed), whether or not early stopping is enabled.
        self.convergence = GainConvergence(window=cfg.run.early_stop_window, rel_tol=cfg.run.early_stop_tol)
        self.partners = data.partners.hidden() if cfg.selmix.setting == "semi" else data.labeled
        log_prior = torch.log(train_counts.clamp_min(1).to(torch.float64) / train_counts.sum())
        self.refresher = Refresher(cfg, self.objective, self.evaluator, labeled=data.labeled,
                                   partners=self.partners, val=data.val, log_prior=log_prior)
        self.step, self.best = 0, {"metric": -math.inf, "step": -1}
        self.backbone = backbone_record(cfg) if cfg.data.features or cfg.model.mode == "online" else None
        # First step with a non-finite loss, kept on the device and checked at polls (no per-step sync).
        self._bad_loss_step = torch.tensor(-1, device=self.acc.device)
        self.plan: ResumePlan = plan_resume(cfg, self.run_dir, self.checkpointer, self.identity())
        if not self.plan.complete:
            self.run_dir.open(fresh=self.plan.state is None)
        elif not self.run_dir.is_complete():  # finished, but killed before the manifest said so
            self.run_dir.open(fresh=False)
            self.run_dir.mark("complete", final_step=int(self.plan.state["step"]))
        head, optimizer, self.scheduler = build_head_and_optimizer(self, init_head)
        if self.plan.state is not None:
            self.plan.apply(self, head, optimizer)
        # Load before prepare: DeepSpeed builds its master weights from the module at prepare time.
        dist.set_deepspeed_micro_batch(self.acc, cfg.optim.batch_size)
        self.head, self.optimizer = self.acc.prepare(head, optimizer)

    def identity(self) -> dict[str, Any]:
        return {"num_classes": self.k, "num_features": self.data.labeled.num_features}

    def plain_head(self) -> torch.nn.Linear:
        return dist.unwrap(self.acc, self.head)

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        if self.plan.complete:
            log.info("run %s is already complete at step %d; nothing to do (report: %s)", self.run_dir.root,
                     self.step, self.run_dir / "report.md")
            return self.summary("already_complete")
        cfg = self.cfg
        write_run_files(self)
        # A finished run logged every record of its last step (validation, test, the best head on test);
        # extended, it keeps them and logs from the next step on. A resumed run redoes its step's records.
        first_new = self.step + 1 if self.plan.extends_finished else self.step
        monitor = Monitor(self.run_dir, enabled=self.run_dir.main, tensorboard=cfg.log.tensorboard,
                          start_step=self.step, first_new_step=first_new, total_steps=cfg.run.steps,
                          progress=cfg.log.progress, class_names=self.data.class_names)
        if self.step == 0:
            monitor.run_config(flatten(cfg), (self.run_dir / "config.yaml").read_text() if self.run_dir.main else "",
                               [f"{s}/{self.objective.target_metric}" for s in ("val", "test")])
        self.preemption.arm()
        stopped_by = "completed"
        try:
            while True:
                if self.refresher.due(self.step):
                    try:
                        record = self.refresher.refresh(self.plain_head(), self.step, self.preemption.requested)
                    except Interrupted:
                        stopped_by = "signal"
                        break
                    if self._after_refresh(record, monitor):
                        stopped_by = "early_stop"
                        break
                if self.step >= cfg.run.steps:
                    break
                if self.data.test is not None and self.step >= first_new and (self.step == 0 or (
                        cfg.run.test_every and self.step % cfg.run.test_every == 0)):
                    self._log_eval(monitor, self.data.test, "test")
                self.train_step(monitor)
                for hook in self.hooks:
                    hook(self)
                if self.step % cfg.run.signal_poll_every == 0:
                    self._check_finite_loss()
                    if self.preemption.requested():
                        stopped_by = "signal"
                        break
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.save_checkpoint()
            if stopped_by == "signal":
                log.warning("signal received: checkpointing step %d and exiting", self.step)
                self.save_checkpoint()
            else:
                self._finish(monitor)
        finally:
            monitor.close()
            self.run_dir.close()
        if stopped_by == "signal":
            self.preemption.requeue()
        return self.summary(stopped_by)

    def summary(self, stopped_by: str) -> dict[str, Any]:
        return {"step": self.step, "stopped_by": stopped_by, "best": self.best}

    # ----------------------------------------------------------------- one step
    def train_step(self, monitor: Monitor | None = None) -> torch.Tensor:
        """Draw pairs from P, mix, one SGD step; advances `step`. No host synchronisation except to log."""
        cfg, step = self.cfg, self.step
        batch = self.refresher.draw(cfg.optim.batch_size, seed=cfg.run.seed, rank=self.rank, step=step)
        xi = self.data.labeled.take(batch.label_index, augment_seed=(cfg.run.seed, self.rank, step, 0))
        xj = self.partners.take(batch.partner_index, augment_seed=(cfg.run.seed, self.rank, step, 1))
        g = generator(cfg.run.seed, self.rank, step, "mixup")
        lam = cfg.selmix.mixup_min + (1.0 - cfg.selmix.mixup_min) * torch.rand(xi.shape[0], 1, generator=g)
        device = self.acc.device
        lam, xi, xj = lam.to(device), xi.to(device, non_blocking=True), xj.to(device, non_blocking=True)
        loss = F.cross_entropy(self.head(lam * xi + (1.0 - lam) * xj), batch.label_class.to(device))
        lr = self.scheduler.get_last_lr()[0]
        self.acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        self._bad_loss_step = torch.where((self._bad_loss_step < 0) & ~torch.isfinite(loss), step,
                                          self._bad_loss_step)
        # Logged at the update's own index, before the next checkpoint boundary, so that a resume (which
        # purges events at or after its step) never drops or duplicates a point.
        if monitor is not None and (step + 1) % cfg.log.log_every == 0:
            value = float(loss)
            monitor.scalars({"train/loss": value, "train/lr": lr}, step)
            monitor.progress(step + 1, {"loss": value})
        self.step += 1
        return loss

    def _check_finite_loss(self) -> None:
        bad = int(self._bad_loss_step)
        if bad >= 0:
            raise NonFiniteStateError(f"the training loss became non-finite at step {bad} (lr "
                                      f"{self.cfg.optim.lr:g}); the run stopped without checkpointing it. Lower "
                                      "optim.lr or check the features; resume=auto restarts from the last "
                                      "checkpoint")

    # ----------------------------------------------------------------- refresh, evaluation, end
    def _after_refresh(self, record: RefreshRecord, monitor: Monitor) -> bool:
        """Log the refresh, keep the best head; True when early stopping fires (same decision on all ranks)."""
        metrics, recall = self.evaluator.metrics(record.counts)
        monitor.evaluation(self.step, "val", metrics, recall)
        monitor.refresh(record, self.objective, self.class_order, self.cfg)
        converged = self.convergence.update(record.result.max_gain)
        target = metrics[self.objective.target_metric]
        if target > self.best["metric"]:
            self.best = {"metric": target, "step": self.step}
            self.run_dir.torch_save({"step": self.step, "metric": target, "head": self.head_state(),
                                     "class_names": self.data.class_names, "config": self.cfg.to_dict(),
                                     "backbone": self.backbone},
                                    self.run_dir.checkpoints / "best.pt")
        if self.cfg.run.early_stop and not self.cfg.selmix.uniform:
            return bool(dist.broadcast_object(converged))
        return False

    def _log_eval(self, monitor: Monitor, fs: FeatureSet, split: str) -> None:
        monitor.evaluation(self.step, split, *self.evaluator.evaluate(self.plain_head(), fs))

    def _finish(self, monitor: Monitor) -> None:
        self._check_finite_loss()
        if self.refresher.step != self.step:
            self._log_eval(monitor, self.data.val, "val")
        if self.data.test is not None:
            self._log_eval(monitor, self.data.test, "test")
            if self.best["step"] not in (-1, self.step):  # the best head on test too (chosen on validation)
                head = read_head(self.run_dir.checkpoints / "best.pt", self.data.labeled.num_features, self.k)
                metrics, recall = self.evaluator.evaluate(head.to(self.acc.device), self.data.test)
                monitor.evaluation(self.step, "test_best", metrics, recall, head_step=self.best["step"])
        self.save_checkpoint(complete=True)
        self.run_dir.mark("complete", final_step=self.step, best=self.best)
        monitor.summary(self.step, self.best, self.objective.target_metric, self.run_dir)

    # ----------------------------------------------------------------- state
    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.plain_head().state_dict().items()}

    def save_checkpoint(self, complete: bool = False) -> None:
        path = self.checkpointer.save(capture(self, complete))
        log.info("checkpoint: step %d → %s", self.step, path)
        dist.barrier()

    def close(self) -> None:
        """Tear the process group down cleanly (call once at the end, on every rank).

        The ranks meet first, and the DDP-wrapped head, which holds the process group, is released before
        accelerate destroys the group; otherwise gloo's threads can outlive it and abort the interpreter.
        """
        self.run_dir.close()
        self.preemption.uninstall()
        dist.barrier()
        self.head = self.optimizer = None
        gc.collect()
        self.acc.end_training()
