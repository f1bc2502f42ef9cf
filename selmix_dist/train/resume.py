"""Whether and how a run continues: which checkpoint, what it may change, and loading it into the run's parts.

The resolved config is the run's identity. A resume is refused, naming every key, when a key that changes
results differs from the checkpoint's config; result-neutral keys (logging, poll intervals, paths that
resolve to the same data) may change and the change is appended to config_history.jsonl; a longer
`run.steps` needs `run.extend_steps=true` (the schedule rule is in core.schedule.LrSchedule).

A checkpoint is the run's header (step, identity, config, world size) and one entry per named stateful part
of the run (head, optimizer, scheduler, objective, convergence, refresh, progress): `checkpoint_body` asks each
part for its `state_dict()`, `ResumePlan.load` hands each part its own entry back. The trainer owns the parts
and names them; nothing here knows the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from selmix_dist.config import Config, flatten, resume_changes
from selmix_dist.train.checkpointer import FORMAT_VERSION, Checkpointer, check_identity, load_checkpoint
from selmix_dist.train.rundir import RunDir

log = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a checkpoint holds of one part: its `state_dict()`, given back to `load_state_dict`."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class HeadState:
    """The head as a checkpoint part: parameters as detached CPU tensors (loadable with weights_only=True)."""

    def __init__(self, head: torch.nn.Module):
        self.head = head

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)


class OptimizerState:
    """The optimizer as a checkpoint part; `sharded` (DeepSpeed shards its state across ranks) stores none.

    SGD without momentum has no state to lose; a checkpoint without optimizer state leaves it as built.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, sharded: bool):
        self.optimizer, self.sharded = optimizer, sharded

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sharded else self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.optimizer.load_state_dict(state)


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

    @property
    def step(self) -> int:
        """The step the run continues from (0 on a fresh start)."""
        return 0 if self.state is None else int(self.state["step"])

    def load(self, parts: Mapping[str, Stateful]) -> None:
        """Hand each named part its entry of the checkpoint (before accelerate.prepare), in the mapping's order."""
        for name, part in parts.items():
            try:
                part.load_state_dict(self.state[name])
            except (RuntimeError, KeyError, ValueError, TypeError) as err:
                raise ValueError(f"checkpoint {self.path} does not fit this run: its '{name}' entry: {err}") from err

    def announce(self, run_dir: RunDir, *, world_size: int, batch_size: int) -> None:
        """Log what the resume changes, and append its result-neutral config changes to config_history.jsonl."""
        if "run.steps" in self.changes:
            old, new = self.changes["run.steps"]
            log.info("run.steps extended from %d to %d: the cosine schedule now spans %d steps", old, new, new)
        saved_world = self.state.get("world_size", world_size)
        if saved_world != world_size and not self.complete:
            log.warning("world size changed from %d to %d: the global batch goes from %d to %d pairs per step",
                        saved_world, world_size, saved_world * batch_size, world_size * batch_size)
        if not self.complete:
            log.info("resumed from %s at step %d", self.path, self.step)
            run_dir.append_config_changes(self.step, self.changes)


def checkpoint_body(parts: Mapping[str, Stateful], *, step: int, complete: bool, identity: dict[str, Any],
                    config: Config, world_size: int) -> dict[str, Any]:
    """Everything that decides the future of the run, as plain tensors and values: the header, then each
    part's state dict under its name."""
    return {
        "format_version": FORMAT_VERSION, "step": step, "complete": complete, "identity": identity,
        "config": flatten(config), "world_size": world_size, "seed": config.run.seed,
        **{name: part.state_dict() for name, part in parts.items()},
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
