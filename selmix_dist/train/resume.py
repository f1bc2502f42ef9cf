"""Whether and how a run continues: which checkpoint, what it may change, and loading it.

The resolved config is the run's identity. A resume is refused, naming every key, when a key that changes
results differs from the checkpoint's config; result-neutral keys (logging, poll intervals, paths that
resolve to the same data) may change and the change is appended to config_history.jsonl; a longer
`run.steps` needs `run.extend_steps=true` (the schedule rule is in core.schedule.LrSchedule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selmix_dist.train.checkpointer import FORMAT_VERSION, Checkpointer, check_identity, load_checkpoint
from selmix_dist.train.config import Config, flatten, resume_changes
from selmix_dist.train.rundir import RunDir

if TYPE_CHECKING:
    from selmix_dist.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    path: Path | None = None
    state: dict[str, Any] | None = None      # None: a fresh start
    complete: bool = False                   # the run finished: nothing is written, nothing is run
    changes: dict[str, tuple] = field(default_factory=dict)  # result-neutral keys that differ

    @property
    def extends_finished(self) -> bool:
        """A finished run resumed for more steps (run.extend_steps): its last step is fully logged."""
        return self.state is not None and bool(self.state.get("complete")) and not self.complete

    def apply(self, trainer: Trainer, head, optimizer) -> None:
        """Load the checkpoint into the trainer's components (before accelerate.prepare)."""
        s = self.state
        try:
            head.load_state_dict(s["head"])
            if s["optimizer"]:
                optimizer.load_state_dict(s["optimizer"])
            trainer.objective.load_state_dict(s["objective"])
            trainer.convergence.load_state_dict(s["convergence"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"checkpoint {self.path} does not fit this run: {err}") from err
        trainer.scheduler.load_state_dict(s["scheduler"])
        trainer.step = int(s["step"])
        trainer.best = dict(s["progress"]["best"])
        trainer.refresher.load_state_dict(s["refresh"])
        if "run.steps" in self.changes:
            old, new = self.changes["run.steps"]
            trainer.scheduler.lr_lambdas[0].total = new
            log.info("run.steps extended from %d to %d: the cosine schedule now spans %d steps", old, new, new)
        saved_world = s.get("world_size", trainer.world)
        if saved_world != trainer.world and not self.complete:
            b = trainer.cfg.optim.batch_size
            log.warning("world size changed from %d to %d: the global batch goes from %d to %d pairs per step",
                        saved_world, trainer.world, saved_world * b, trainer.world * b)
        if not self.complete:
            log.info("resumed from %s at step %d", self.path, trainer.step)
            trainer.run_dir.append_config_changes(trainer.step, self.changes)


def capture(trainer: Trainer, complete: bool = False) -> dict[str, Any]:
    """Everything that decides the future of the run, as plain tensors and values (the checkpoint body)."""
    uses_deepspeed = trainer.acc.distributed_type.name == "DEEPSPEED"
    return {
        "format_version": FORMAT_VERSION, "step": trainer.step, "complete": complete,
        "identity": trainer.identity(), "config": flatten(trainer.cfg), "world_size": trainer.world,
        "head": trainer.head_state(),
        # DeepSpeed shards optimizer state across ranks; SGD without momentum has none to lose.
        "optimizer": {} if uses_deepspeed else trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "objective": trainer.objective.state_dict(),
        "convergence": trainer.convergence.state_dict(), "refresh": trainer.refresher.state_dict(),
        "progress": {"best": trainer.best}, "seed": trainer.cfg.run.seed,
    }


def plan_resume(cfg: Config, run_dir: RunDir, checkpointer: Checkpointer, identity: dict[str, Any]) -> ResumePlan:
    """Decide fresh start / resume / already complete, refusing what would mix two different runs."""
    mode = cfg.run.resume
    if mode == "never":
        if checkpointer.any_present() and not cfg.run.overwrite:
            raise ValueError(f"{checkpointer.dir} already holds checkpoints; use run.resume=auto, another run.dir, "
                             "or run.overwrite=true (removes only what that run wrote)")
        return ResumePlan()
    if mode == "auto":
        found = checkpointer.latest()
        if found is None:
            if checkpointer.any_present() and not cfg.run.overwrite:
                raise ValueError(f"{checkpointer.dir} holds checkpoints but none is usable (see the warnings); "
                                 "move them away or set run.overwrite=true to start over")
            if run_dir.is_complete() and not cfg.run.overwrite:
                raise ValueError(f"run {run_dir.root} is complete but its step checkpoints are gone: nothing to "
                                 "resume; set run.overwrite=true to run it again from scratch")
            return ResumePlan()
        path, state = found
    else:
        path = Path(mode)
        state = load_checkpoint(path)
    check_identity(path, state["identity"], identity)
    refused, allowed = resume_changes(state["config"], cfg)
    if refused:
        listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in refused.items())
        raise ValueError(f"cannot resume from {path}: the config differs in keys that change results ({listed}). "
                         "Resume with the run's own values (its config.yaml), use another run.dir, or start over "
                         "with run.resume=never run.overwrite=true" +
                         ("; a longer run.steps needs run.extend_steps=true" if "run.steps" in refused else ""))
    complete = bool(state.get("complete")) and not cfg.run.extend_steps
    return ResumePlan(path, state, complete, allowed)
