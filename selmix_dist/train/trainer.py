"""The SelMix fine-tuning loop (method doc §4), distributed through accelerate.

Per refresh (every `run.refresh_every` steps): sharded validation pass → reduced confusion counts and
class feature sums → prototypes, C, multipliers, G, P on every rank (rank 0's P is broadcast so the ranks
cannot drift apart) → pseudo-labels of the unlabeled shard of each rank, gathered → pair sampler rebuilt.
Per step: each rank draws its pairs from the common P with the (seed, rank, step) sampler, mixes features
with λ ~ U[mixup_min, 1], and takes an SGD step on cross-entropy with the label of the dominant sample;
accelerate synchronises the gradients (DDP, or DeepSpeed through its plugin).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selmix_dist import atomic
from selmix_dist import distributed as dist
from selmix_dist.core import (
    GainConvergence,
    PairSampler,
    build_objective,
    compute_metrics,
    gain_matrix,
    head_tail_masks,
    per_class_metrics,
    selmix_distribution,
)
from selmix_dist.core.rng import generator
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.report import PLOTS, REQUIRED_FILES, write_report
from selmix_dist.train import checkpoint as ckpt
from selmix_dist.train.config import Config, save_config
from selmix_dist.train.monitor import Monitor
from selmix_dist.train.statistics import (
    gather_pseudo_labels,
    local_pass,
    local_pseudo_labels,
    split_statistics,
)

_SIGNALS_SEEN: list[int] = []
# Everything the trainer and the report write into run.dir (a fresh start removes exactly these).
_RUN_ARTIFACTS = ("checkpoints", "tb", "init_head.pt", *REQUIRED_FILES, "report.json", "report.csv", "report.md",
                  *PLOTS)


def _on_signal(signum, _frame) -> None:
    _SIGNALS_SEEN.append(signum)


@dataclass
class SamplingState:
    """What the pair sampler is built from; checkpointed, so a resume draws exactly the same pairs."""

    step: int                       # the refresh that decided it
    distribution: torch.Tensor      # float64[K, K] P
    partner_labels: torch.Tensor    # int64[N2]: labeled labels, or pseudo-labels (−1: none)


@dataclass
class RefreshState(SamplingState):
    """Everything one refresh measured and decided (logged, not checkpointed)."""

    counts: torch.Tensor = None     # int64[K, K] validation confusion counts
    prototypes: torch.Tensor = None  # float64[K, d]
    gain: torch.Tensor = None       # float64[K, K]
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Named wall-clock laps (seconds) plus their total."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self.laps["total"] = now - self._start
        self._last = now


class Trainer:
    """Owns the head, optimizer, objective, sampler and run directory of one SelMix run."""

    def __init__(self, cfg: Config, data: TrainData, accelerator=None, init_head: torch.nn.Module | None = None):
        self.cfg = cfg
        self.data = data
        data.validate(cfg.data.num_classes)
        if cfg.selmix.setting == "semi" and data.partners is None:
            raise ValueError("selmix.setting=semi needs an unlabeled split (data.unlabeled_split)")
        self.acc = accelerator or dist.make_accelerator()
        self.device = self.acc.device
        self.rank, self.world = dist.world_info()
        self.k = data.num_classes
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.partners = (data.partners.hidden() if cfg.selmix.setting == "semi" else data.labeled)

        train_counts = data.train_class_counts()
        self.class_order = torch.argsort(train_counts, descending=True, stable=True)  # heatmap rows: head first
        self.head_mask, _ = head_tail_masks(train_counts, head_fraction=cfg.data.head_fraction)
        self.log_prior = torch.log(train_counts.clamp_min(1).to(torch.float64) / train_counts.sum())
        self.objective = build_objective(cfg.objective.name, self.k, head=self.head_mask, **cfg.objective.params)
        # Also the run's max-gain history (checkpointed), whether or not early stopping is enabled.
        self.convergence = GainConvergence(window=cfg.run.early_stop_window, rel_tol=cfg.run.early_stop_tol)

        resume_path, state = self._find_resume()
        if state is None:
            self._clear_previous_attempt()
        head = init_head if init_head is not None else self._initial_head(state)
        if head.weight.shape != (self.k, data.labeled.num_features):
            raise ValueError(f"starting head has shape {tuple(head.weight.shape)}, expected "
                             f"({self.k}, {data.labeled.num_features})")
        optimizer = torch.optim.SGD(
            [{"params": [head.weight], "weight_decay": cfg.optim.weight_decay},
             {"params": [head.bias], "weight_decay": 0.0}],
            lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.step = 0
        self.best = {"metric": -math.inf, "step": -1}
        self.sampling: SamplingState | None = None
        self._last_snapshot: dict | None = None  # P and G of the latest refresh, for the report
        if state is not None:
            self._load_state(resume_path, state, head, optimizer)
        # Load before prepare: DeepSpeed builds its master weights from the module at prepare time.
        dist.set_deepspeed_micro_batch(self.acc, cfg.optim.batch_size)
        self.head, self.optimizer = self.acc.prepare(head, optimizer)
        self.sampler: PairSampler | None = None  # built by the first refresh, or from the checkpoint
        if self.sampling is not None:
            self._build_sampler(self.sampling)

    # ----------------------------------------------------------------- set-up
    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.optim.warmup_steps
        if step < warm:
            return (step + 1) / warm
        if self.cfg.optim.schedule == "constant":
            return 1.0
        span = max(self.cfg.run.steps - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))

    def _identity(self) -> dict[str, Any]:
        return {"objective": self.cfg.objective.name, "num_classes": self.k,
                "setting": self.cfg.selmix.setting, "num_features": self.data.labeled.num_features}

    def _find_resume(self) -> tuple[Path | None, dict | None]:
        mode = self.cfg.run.resume
        if mode == "never":
            if ckpt.list_step_checkpoints(self.ckpt_dir) and not self.cfg.run.overwrite:
                raise ValueError(f"{self.ckpt_dir} already holds checkpoints; use run.resume=auto, "
                                 "another run.dir, or run.overwrite=true")
            return None, None
        if mode == "auto":
            found = ckpt.latest_valid_checkpoint(self.ckpt_dir)
            if found is None:
                if ckpt.list_step_checkpoints(self.ckpt_dir) and not self.cfg.run.overwrite:
                    raise ValueError(f"{self.ckpt_dir} holds checkpoints but none is usable (see the warnings); "
                                     "move them away or set run.overwrite=true to start over")
                return None, None
            path, state = found
        else:
            path = Path(mode)
            state = ckpt.load_checkpoint(path)
        ckpt.check_identity(path, state["identity"], self._identity())
        return path, state

    def _clear_previous_attempt(self) -> None:
        """A fresh start: remove what an earlier attempt in this run.dir wrote (only our own artifacts).

        Reached only when there is no checkpoint to resume, or `run.overwrite=true` asked for a restart;
        otherwise stale TensorBoard events, P snapshots or a cached starting head would mix into this run.
        """
        if dist.is_main_process() and self.run_dir.is_dir():
            for name in _RUN_ARTIFACTS:
                path = self.run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        dist.barrier()

    def _initial_head(self, state: dict | None) -> torch.nn.Linear:
        """The starting head: from the checkpoint's shape (resume), a file, or fitted on rank 0 and cached."""
        d = self.data.labeled.num_features
        head = torch.nn.Linear(d, self.k)
        if state is not None:
            return head  # weights come from the checkpoint
        spec = self.cfg.model.init_head
        if spec == "zeros":
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            return head
        if spec in ("la", "ce", "fixmatch_la"):
            cached = self.run_dir / "init_head.pt"
            if dist.is_main_process() and not cached.exists():
                fitted = self._fit_initial_head(spec)
                atomic.torch_save(fitted.state_dict(), cached)
            dist.barrier()
            head.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
            return head
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"config key 'model.init_head': {spec!r} is neither 'la', 'ce', 'fixmatch_la', "
                             "'zeros' nor an existing file")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("head", sd) if isinstance(sd, dict) else sd
        try:
            head.load_state_dict(sd)
        except (RuntimeError, KeyError) as err:
            raise ValueError(f"head file {path} does not fit a Linear({d}, {self.k}): {err}") from err
        return head

    def _fit_initial_head(self, spec: str) -> torch.nn.Linear:
        """Deterministic starting head on the labeled features (L-BFGS), optionally self-trained."""
        from selmix_dist.heads import fit_head, self_train_head

        lab, cfg = self.data.labeled, self.cfg
        feats = lab.take(torch.arange(len(lab)))
        head = fit_head(feats, lab.labels, self.k, loss="ce" if spec == "ce" else "logit_adjusted",
                        weight_decay=cfg.optim.weight_decay, max_iter=cfg.model.init_head_steps,
                        seed=cfg.run.seed)
        if spec == "fixmatch_la":
            part = self.data.partners
            head = self_train_head(head, feats, lab.labels, part.take(torch.arange(len(part))),
                                   steps=cfg.model.init_head_steps, seed=cfg.run.seed)
        return head

    # ----------------------------------------------------------------- state
    def _load_state(self, path: Path, state: dict, head: torch.nn.Linear, optimizer) -> None:
        try:
            head.load_state_dict(state["head"])
            if state["optimizer"]:
                optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["objective"])
            self.convergence.load_state_dict(state["convergence"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"checkpoint {path} does not fit this run: {err}") from err
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.best = dict(state["progress"]["best"])
        r = state["refresh"]
        self.sampling = SamplingState(int(r["step"]), r["distribution"], r["partner_labels"])

    def state_dict(self) -> dict[str, Any]:
        r = self.sampling
        uses_deepspeed = self.acc.distributed_type.name == "DEEPSPEED"
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "step": self.step,
            "identity": self._identity(),
            "head": {k: v.detach().cpu() for k, v in self.acc.unwrap_model(self.head).state_dict().items()},
            # DeepSpeed shards optimizer state across ranks; SGD without momentum has none to lose.
            "optimizer": {} if uses_deepspeed else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "convergence": self.convergence.state_dict(),
            "refresh": {"step": r.step, "distribution": r.distribution, "partner_labels": r.partner_labels},
            "progress": {"best": self.best},
            "seed": self.cfg.run.seed,
        }

    def save_checkpoint(self) -> None:
        if dist.is_main_process():
            atomic.torch_save(self.state_dict(), ckpt.step_path(self.ckpt_dir, self.step))
            ckpt.prune(self.ckpt_dir, self.cfg.run.keep_checkpoints)
            # P and G of the latest refresh for the report; written with checkpoints, not every refresh
            # (two K×K tensors: 530 MB at K = 8142).
            if self._last_snapshot is not None:
                atomic.torch_save(self._last_snapshot, self.run_dir / "distribution_last.pt")
        dist.barrier()

    # ----------------------------------------------------------------- refresh
    def _plain_head(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.head)

    def refresh(self) -> RefreshState:
        """Recompute C, prototypes, multipliers, G, P and pseudo-labels at the current step."""
        cfg, clock = self.cfg, _Clock()
        head = self._plain_head()
        local = local_pass(head, self.data.val, self.k, cfg.data.eval_batch_size, self.device, with_features=True)
        local_pseudo = None
        if cfg.selmix.setting == "semi" and self._pseudo_label_due():
            scaled_prior = self.log_prior * cfg.selmix.pseudo_logit_adjust if cfg.selmix.pseudo_logit_adjust else None
            local_pseudo = local_pseudo_labels(head, self.partners, cfg.data.eval_batch_size, self.device,
                                               cfg.selmix.pseudo_threshold, scaled_prior)
        clock.lap("eval")
        stats = local.reduce(self.data.val.labels, self.k)
        if local_pseudo is not None:
            partner_labels = gather_pseudo_labels(local_pseudo)
        else:
            partner_labels = self.sampling.partner_labels if cfg.selmix.setting == "semi" else self.data.labeled.labels
        clock.lap("all_reduce")
        joint = stats.counts.to(torch.float64) / stats.counts.sum()
        prototypes = stats.prototypes()
        self.objective.update_multipliers(joint)
        if cfg.selmix.uniform:
            gain = torch.zeros(self.k, self.k, dtype=torch.float64)
            distribution = torch.full((self.k, self.k), 1.0 / self.k**2, dtype=torch.float64)
        else:
            psi = self.objective.gradient(joint)
            gain = gain_matrix(prototypes.to(self.device), head.weight.detach().to(torch.float64),
                               head.bias.detach().to(torch.float64), joint.to(self.device), psi.to(self.device),
                               variant=cfg.selmix.gain_variant, include_bias=cfg.selmix.include_bias,
                               prior=cfg.selmix.prior, mixup_mean=(cfg.selmix.mixup_min + 1) / 2).cpu()
            distribution = selmix_distribution(gain, temperature=cfg.selmix.temperature, eps=cfg.selmix.eps,
                                               positive_only=cfg.selmix.positive_only,
                                               relative=cfg.selmix.relative_temperature).cpu()
        clock.lap("gain")
        # Every rank computed the same P from the same reduced statistics; rank 0's copy is authoritative.
        distribution = dist.broadcast_tensor(distribution)
        clock.lap("broadcast")
        state = RefreshState(self.step, distribution, partner_labels, stats.counts, prototypes, gain)
        self._build_sampler(state)
        clock.lap("sampler")
        state.timings = clock.laps
        self.sampling = state
        return state

    def _pseudo_label_due(self) -> bool:
        """Pseudo-label at the first refresh and then every `selmix.pseudo_label_every` refreshes."""
        refresh_index = self.step // self.cfg.run.refresh_every
        return self.sampling is None or refresh_index % self.cfg.selmix.pseudo_label_every == 0

    def _build_sampler(self, state: SamplingState) -> None:
        self.sampler = PairSampler(self.data.labeled.labels, state.partner_labels, self.k)
        self.sampler.set_distribution(state.distribution)

    def close(self) -> None:
        """Tear the process group down cleanly (call once at the end, on every rank).

        The ranks meet first, and the DDP-wrapped head, which holds the process group, is released before
        accelerate destroys the group; otherwise gloo's threads can outlive it and abort the interpreter
        at exit.
        """
        dist.barrier()
        self.head = self.optimizer = None
        gc.collect()
        self.acc.end_training()

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, fs: FeatureSet) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics and per-class recall float64[K] of the current head on a split (sharded, reduced)."""
        stats = split_statistics(self._plain_head(), fs, self.k, self.cfg.data.eval_batch_size,
                                 self.device, with_features=False)
        return self._metrics_of(stats.counts)

    def _metrics_of(self, counts: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        return compute_metrics(counts, head=self.head_mask), per_class_metrics(counts)["recall"]

    # ----------------------------------------------------------------- step
    def train_step(self) -> float:
        cfg, step = self.cfg, self.step
        batch = self.sampler.sample(cfg.optim.batch_size, seed=cfg.run.seed, rank=self.rank, step=step)
        xi = self.data.labeled.take(batch.label_index, augment_seed=(cfg.run.seed, self.rank, step, 0))
        xj = self.partners.take(batch.partner_index, augment_seed=(cfg.run.seed, self.rank, step, 1))
        g = generator(cfg.run.seed, self.rank, step, "mixup")
        lam = cfg.selmix.mixup_min + (1.0 - cfg.selmix.mixup_min) * torch.rand(xi.shape[0], 1, generator=g)
        mixed = (lam * xi + (1.0 - lam) * xj).to(self.device)
        loss = F.cross_entropy(self.head(mixed), batch.label_class.to(self.device))
        self.acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ----------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        main = dist.is_main_process()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self._write_meta()
        monitor = Monitor(self.run_dir, enabled=main, tensorboard=cfg.log.tensorboard, start_step=self.step,
                          total_steps=cfg.run.steps, progress=cfg.log.progress)
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        _SIGNALS_SEEN.clear()
        stopped_by = None
        try:
            while True:
                if self.step % cfg.run.refresh_every == 0 and (
                        self.sampling is None or self.sampling.step != self.step):
                    if self._refresh_and_log(monitor):
                        stopped_by = "early_stop"
                        break
                if self.step >= cfg.run.steps:
                    break
                if self.data.test is not None and (self.step == 0 or (
                        cfg.run.test_every and self.step % cfg.run.test_every == 0)):
                    self._log_eval(monitor, self.data.test, "test")
                lr = self.scheduler.get_last_lr()[0]
                loss = self.train_step()
                # Logged at the update's own index, before the next checkpoint boundary, so that a resume
                # (which purges events at or after its step) never drops or duplicates a point.
                if (self.step + 1) % cfg.log.log_every == 0:
                    monitor.scalars({"train/loss": loss, "train/lr": lr}, self.step)
                self.step += 1
                monitor.progress(self.step, {"loss": loss})
                if self.step % cfg.run.signal_poll_every == 0 and dist.any_rank(bool(_SIGNALS_SEEN)):
                    stopped_by = "signal"
                    self.save_checkpoint()
                    break
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.save_checkpoint()
            if stopped_by != "signal":
                self._finish(monitor)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            monitor.close()
        if stopped_by == "signal" and cfg.run.requeue and main and os.environ.get("SLURM_JOB_ID"):
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        return {"step": self.step, "stopped_by": stopped_by or "completed", "best": self.best}

    def _refresh_and_log(self, monitor: Monitor) -> bool:
        """Refresh, log, keep the best head; True when early stopping fires (same decision on all ranks)."""
        state = self.refresh()
        metrics, recall = self._metrics_of(state.counts)
        step = self.step
        monitor.evaluation(step, "val", metrics, recall)
        max_gain = float(state.gain.max())
        converged = self.convergence.update(max_gain)
        p = state.distribution
        entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
        monitor.scalars({"selmix/max_gain": max_gain, "selmix/entropy_P": entropy,
                         **{f"time/refresh_{k}": v for k, v in state.timings.items()}}, step)
        for name, values in self.objective.multipliers().items():
            monitor.per_class(f"multipliers/{name}", values.flatten(), step)
        if self.cfg.selmix.setting == "semi":
            counts = torch.bincount(state.partner_labels[state.partner_labels >= 0], minlength=self.k)
            monitor.per_class("pseudo_labels/count", counts.to(torch.float64), step)
        refresh_index = step // self.cfg.run.refresh_every
        if refresh_index % self.cfg.log.image_every == 0:
            monitor.image("selmix/P", p, step, self.class_order)
            monitor.image("selmix/G", state.gain, step, self.class_order)
        target = metrics[self.objective.target_metric]
        self._last_snapshot = {"step": step, "P": p.to(torch.float32), "G": state.gain.to(torch.float32)}
        if dist.is_main_process():
            first = self.run_dir / "distribution_first.pt"
            if not first.exists():
                atomic.torch_save(self._last_snapshot, first)
            if target > self.best["metric"]:
                atomic.torch_save({"step": step, "metric": target,
                                        "head": self.acc.unwrap_model(self.head).state_dict()},
                                       self.ckpt_dir / "best.pt")
        if target > self.best["metric"]:
            self.best = {"metric": target, "step": step}
        if self.cfg.run.early_stop and not self.cfg.selmix.uniform:
            return bool(dist.broadcast_object(converged))
        return False

    def _log_eval(self, monitor: Monitor, fs: FeatureSet, split: str) -> dict[str, float]:
        metrics, recall = self.evaluate(fs)
        monitor.evaluation(self.step, split, metrics, recall)
        return metrics

    def _finish(self, monitor: Monitor) -> None:
        if self.sampling is None or self.sampling.step != self.step:
            self._log_eval(monitor, self.data.val, "val")
        if self.data.test is not None:
            self._log_eval(monitor, self.data.test, "test")
        self.save_checkpoint()
        if dist.is_main_process():
            write_report(self.run_dir)

    def _write_meta(self) -> None:
        meta = {"class_names": self.data.class_names or [str(i) for i in range(self.k)],
                "train_class_counts": self.data.train_class_counts().tolist(),
                "objective": self.cfg.objective.name, "target_metric": self.objective.target_metric,
                "num_classes": self.k, "world_size": self.world}
        (self.run_dir / "meta.json").write_text(json.dumps(meta, indent=1))
