"""The SelMix fine-tuning loop (docs/method.md §5), distributed through accelerate.

    refresh (every run.refresh_every steps) → draw pairs from P → mix features → SGD step on the head
    → hooks → poll for a stop → checkpoint when due → … → final evaluation and checkpoint

The trainer owns its components and hands each what it needs; none of them imports it. `RunDir` (paths,
manifest, lock), `Checkpointer` (find, verify, save when due, prune, best.pt), `Evaluator` (sharded passes),
`Refresher` (C, pseudo-labels, G, P, sampler), `Stopping` (why the loop ends), `Monitor` (log, TensorBoard,
history), `Preemption` (signals, requeue); `build` makes the start head, the optimizer and its schedule, and
`resume` loads a checkpoint into the named stateful parts (`_parts`). The trainer's own state is its step.
Each rank draws its own pairs with the (seed, rank, step) generator; accelerate synchronises gradients.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from selmix_dist import distributed as dist
from selmix_dist.config import Config, flatten
from selmix_dist.core import build_objective, head_tail_masks
from selmix_dist.core.plugin import constraint_violation
from selmix_dist.core.rng import generator
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.memory import map_large_blocks
from selmix_dist.train.build import (
    RunSchedule,
    backbone_record,
    build_optimizer,
    check_data,
    start_head,
    write_run_files,
)
from selmix_dist.train.checkpointer import Checkpointer
from selmix_dist.train.evaluator import Evaluator, Interrupted
from selmix_dist.train.monitor import Monitor
from selmix_dist.train.preemption import Preemption
from selmix_dist.train.refresher import Refresher, RefreshRecord
from selmix_dist.train.resume import HeadState, OptimizerState, ResumePlan, Stateful, checkpoint_body, plan_resume
from selmix_dist.train.rundir import RunDir
from selmix_dist.train.stopping import SIGNAL, Stopping

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
        if cfg.selmix.coverage_floor and self.acc.distributed_type.name == "DEEPSPEED":
            # ZeRO keeps its own fp32 copy of the head, from which it writes the module back: the floored biases
            # written into the final head, outside the optimizer, would not be what an extension resumes from.
            raise ValueError("config key 'selmix.coverage_floor' writes the floored biases into the run's final "
                             "head, outside the optimizer, where DeepSpeed's ZeRO keeps its own copy: run without "
                             "DeepSpeed")
        self.rank, self.world = dist.world_info()
        self.k = data.num_classes
        self.preemption = preemption or Preemption(cfg.run.requeue).install()
        self.run_dir = RunDir(cfg.run.dir, main=dist.is_main_process(), lock_stale_seconds=cfg.run.lock_stale_seconds)
        self.checkpointer = Checkpointer(self.run_dir, cfg.run.keep_checkpoints, every=cfg.run.checkpoint_every)
        train_counts = data.train_class_counts()
        head_mask, _ = head_tail_masks(train_counts, head_fraction=cfg.data.head_fraction)
        self.class_order = torch.argsort(train_counts, descending=True, stable=True)  # heatmaps: head first
        self.evaluator = Evaluator(self.k, cfg.data.eval_batch_size, self.acc.device, head_mask)
        self.objective = build_objective(cfg.objective.name, self.k, head=head_mask,
                                         head_fraction=cfg.data.head_fraction, **cfg.objective.active())
        self.stopping = Stopping(cfg.run, gain_guided=not cfg.selmix.uniform, preemption=self.preemption,
                                 lr=cfg.optim.lr, device=self.acc.device)
        self.partners = data.partners.hidden() if cfg.selmix.setting == "semi" else data.labeled
        log_prior = torch.log(train_counts.clamp_min(1).to(torch.float64) / train_counts.sum())
        self.refresher = Refresher(cfg.selmix, self.objective, self.evaluator, refresh_every=cfg.run.refresh_every,
                                   labeled=data.labeled, partners=self.partners, val=data.val, log_prior=log_prior,
                                   lr_sum=lambda start, stop: self.scheduler.lr_sum(start, stop))
        self.backbone = backbone_record(cfg) if cfg.data.features or cfg.model.mode == "online" else None
        self.plan: ResumePlan = plan_resume(cfg, self.run_dir, self.checkpointer, self.identity())
        if not self.plan.complete:
            self.run_dir.open(fresh=self.plan.state is None)
        elif not self.run_dir.is_complete():  # finished, but killed before the manifest said so
            self.run_dir.open(fresh=False)
            self.run_dir.mark("complete", final_step=self.plan.step)
        resuming = self.plan.state is not None
        # A resumed head only needs its shape here: its weights are the checkpoint's.
        head = (torch.nn.Linear(data.labeled.num_features, self.k) if resuming
                else start_head(cfg, data, self.run_dir, init_head))
        optimizer = build_optimizer(head, cfg.optim)
        self.scheduler = RunSchedule(optimizer, cfg.optim, total_steps=cfg.run.steps)
        self.step = self.plan.step
        self._floored: tuple[int, torch.nn.Linear] | None = None   # (step, floored copy): selmix.coverage_floor
        if resuming:
            self.plan.load(self._parts(head, optimizer))
            self.plan.announce(self.run_dir, world_size=self.world, batch_size=cfg.optim.batch_size)
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
        write_run_files(self.run_dir, cfg, self.data, target_metric=self.objective.target_metric,
                        world_size=self.world)
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
        try:
            stopped_by = self._train(monitor, first_new)
            if stopped_by == SIGNAL:
                log.warning("signal received: checkpointing step %d and exiting", self.step)
                self.checkpointer.save(self.step, self._checkpoint, force=True)
            else:
                self._finish(monitor)
        finally:
            monitor.close()
            self.run_dir.close()
        if stopped_by == SIGNAL:
            self.preemption.requeue()
        return self.summary(stopped_by)

    def _train(self, monitor: Monitor, first_new: int) -> str:
        """Steps until `stopping` (or a signal during a refresh) gives the reason, which is returned."""
        while True:
            if self.refresher.due(self.step):
                try:
                    record = self.refresher.refresh(self.plain_head(), self.step, self.preemption.requested)
                except Interrupted:
                    return SIGNAL
                if stop := self._after_refresh(record, monitor):
                    return stop
            if stop := self.stopping.before_step(self.step):
                return stop
            if self._test_due(first_new):
                self._log_eval(monitor, self.data.test, "test")
            self.train_step(monitor)
            for hook in self.hooks:
                hook(self)
            if stop := self.stopping.after_step(self.step):
                return stop
            self.checkpointer.save(self.step, self._checkpoint)

    def summary(self, stopped_by: str) -> dict[str, Any]:
        return {"step": self.step, "stopped_by": stopped_by, "best": self.checkpointer.best}

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
        self.stopping.note_loss(step, loss)
        # Logged at the update's own index, before the next checkpoint boundary, so that a resume (which
        # purges events at or after its step) never drops or duplicates a point.
        if monitor is not None and (step + 1) % cfg.log.log_every == 0:
            value = float(loss)
            monitor.scalars({"train/loss": value, "train/lr": lr}, step)
            monitor.progress(step + 1, {"loss": value})
        self.step += 1
        return loss

    # ----------------------------------------------------------------- refresh, evaluation, end
    def _after_refresh(self, record: RefreshRecord, monitor: Monitor) -> str | None:
        """Log the refresh, offer the head as the best one; the stop reason if early stopping fires."""
        metrics, recall = self.evaluator.metrics(record.counts)
        monitor.evaluation(self.step, "val", metrics, recall)
        monitor.refresh(record, self.objective, self.class_order, self.cfg)
        violation = constraint_violation(record.counts, self.objective, self.evaluator.head_mask)
        if record.floored_head is not None:
            self._floored = (self.step, record.floored_head)
        measured = self._evaluated_head()
        self.checkpointer.save_if_best(self.step, metrics[self.objective.target_metric],
                                       lambda: self._best_payload(measured), violation=violation)
        return self.stopping.after_refresh(record.result.max_gain)

    def _test_due(self, first_new: int) -> bool:
        """Test at step 0 and every run.test_every steps (0: only at the end), except steps already logged."""
        every = self.cfg.run.test_every
        return self.data.test is not None and self.step >= first_new and (
            self.step == 0 or (every > 0 and self.step % every == 0))

    def _evaluated_head(self) -> torch.nn.Linear:
        """The head that evaluations, best.pt and the run's output stand for. With selmix.coverage_floor, a floored
        copy of the training head (the refresh's own at a refresh step): the training head keeps its biases, since
        steps from a floored head fight the floor (docs/method.md §2.6)."""
        if not self.cfg.selmix.coverage_floor:
            return self.plain_head()
        if self._floored is None or self._floored[0] != self.step:
            self._floored = (self.step, self.refresher.coverage_floor(self.plain_head()).head)
        return self._floored[1]

    def _log_eval(self, monitor: Monitor, fs: FeatureSet, split: str) -> None:
        monitor.evaluation(self.step, split, *self.evaluator.evaluate(self._evaluated_head(), fs))

    def _finish(self, monitor: Monitor) -> None:
        self.stopping.check_finite_loss()
        if self.cfg.selmix.coverage_floor:   # the run's head is the floored one (an extension continues from it)
            floored = self._evaluated_head()
            with torch.no_grad():
                self.plain_head().bias.copy_(floored.bias)
        if self.refresher.step != self.step:
            self._log_eval(monitor, self.data.val, "val")
        best = self.checkpointer.best
        if self.data.test is not None:
            self._log_eval(monitor, self.data.test, "test")
            if best["step"] not in (-1, self.step):  # the best head on test too (chosen on validation)
                head = self.checkpointer.best_head(self.data.labeled.num_features, self.k)
                metrics, recall = self.evaluator.evaluate(head.to(self.acc.device), self.data.test)
                monitor.evaluation(self.step, "test_best", metrics, recall, head_step=best["step"])
        if self.cfg.plugin.enabled:
            self._plug_in(monitor)
        self.checkpointer.save(self.step, lambda: self._checkpoint(complete=True), force=True)
        self.run_dir.mark("complete", final_step=self.step, best=best)
        monitor.summary(self.step, best, self.objective.target_metric, self.run_dir)

    def _plug_in(self, monitor: Monitor) -> None:
        """plugin.enabled: per-class log-weights tuned on validation for the run's objective on the best head
        (docs/method.md §6.1), saved as checkpoints/plugin.pt (a head like best.pt's) and plugin.json. Every rank
        computes the same deterministic weights from the whole validation set; rank 0 writes."""
        from selmix_dist.heads.plugin import fit_plugin_head

        best = self.checkpointer.best
        d = self.data.labeled.num_features
        head = self.checkpointer.best_head(d, self.k) if best["step"] != -1 else self.plain_head()
        head = copy.deepcopy(head).cpu().float()
        val = self.data.val
        plug, result = fit_plugin_head(head, val.take(torch.arange(len(val))), val.labels, self.objective,
                                       self.evaluator.head_mask, iterations=self.cfg.plugin.iterations,
                                       polish_sweeps=self.cfg.plugin.polish_sweeps)
        record = {"head_step": best["step"] if best["step"] != -1 else self.step,
                  "objective": self.objective.name, "log_weights": result.log_weights.tolist(),
                  "val": result.metrics, "val_score": list(result.score), "start_val_score": list(result.start_score)}
        if self.data.test is not None:
            record["test"] = self.evaluator.evaluate(plug.to(self.acc.device), self.data.test)[0]
        target = self.objective.target_metric
        self.run_dir.torch_save({"step": record["head_step"], "metric": result.metrics.get(target),
                                 **self._best_payload(), "head": HeadState(plug).state_dict(),
                                 "plugin": record}, self.run_dir.checkpoints / "plugin.pt")
        monitor.plugin(self.step, record, target)

    # ----------------------------------------------------------------- state
    def _parts(self, head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Stateful]:
        """The run's stateful parts by checkpoint entry, in load order; the step is the checkpoint's header."""
        return {"head": HeadState(head),
                "optimizer": OptimizerState(optimizer, sharded=self.acc.distributed_type.name == "DEEPSPEED"),
                "objective": self.objective, "convergence": self.stopping.convergence, "scheduler": self.scheduler,
                "progress": self.checkpointer, "refresh": self.refresher}

    def _checkpoint(self, complete: bool = False) -> dict[str, Any]:
        return checkpoint_body(self._parts(self.plain_head(), self.optimizer), step=self.step, complete=complete,
                               identity=self.identity(), config=self.cfg, world_size=self.world)

    def _best_payload(self, head: torch.nn.Linear | None = None) -> dict[str, Any]:
        """What best.pt holds besides its step and metric: the head (default: the training head) and what names it
        (classes, config, backbone)."""
        head = self.plain_head() if head is None else head
        return {"head": HeadState(head).state_dict(), "class_names": self.data.class_names,
                "config": self.cfg.to_dict(), "backbone": self.backbone}

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
