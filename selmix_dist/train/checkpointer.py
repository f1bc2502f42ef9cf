"""Checkpoints: find, verify, load, save when due, prune, keep the best head — and what a resume may change.

A checkpoint is one `torch.save`d dict of plain tensors and Python values (loadable with
`weights_only=True`) holding everything that decides the future of the run (head, optimizer, schedule,
objective multipliers, P and partner labels, gain history, step, best metric), the resolved config that
produced it, and `checksum`: a sha256 over every other entry's content, verified at load, so a bit flip
is caught even where the container still unpickles. A checkpoint with a non-finite head is never written.
Files are written atomically (selmix_dist.atomic), so a crash mid-write leaves the previous one intact.
The `Checkpointer` decides when: the loop offers it every step, and it writes every `run.checkpoint_every`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selmix_dist import distributed as dist
from selmix_dist.heads.start import read_head
from selmix_dist.torch_files import load_tensors
from selmix_dist.train.rundir import RunDir

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED_KEYS = ("format_version", "step", "identity", "config", "head", "optimizer", "scheduler", "objective",
                 "refresh", "progress", "checksum")


class NonFiniteStateError(FloatingPointError):
    """The head or the loss became NaN/inf; the message names the step."""


def content_checksum(state: dict[str, Any]) -> str:
    """sha256 over the dtype, shape and bytes of every tensor and the repr of every other value (keys sorted)."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(obj, dict):
            h.update(b"{")
            for key in sorted(obj, key=str):
                h.update(repr(key).encode())
                feed(obj[key])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for item in obj:
                feed(item)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    feed({k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def list_step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint; ValueError naming the file and the reason if it is unusable."""
    state = load_tensors(path, "checkpoint")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is not a selmix_dist checkpoint")
    version = state.get("format_version")
    if version == 1:
        state = _migrate_v1(state)
    elif version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {version}, expected {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    if state["checksum"] is not None and content_checksum(state) != state["checksum"]:
        raise ValueError(f"checkpoint {path} fails its content checksum (corrupted on disk)")
    if not all(bool(torch.isfinite(t).all()) for t in state["head"].values()):
        raise ValueError(f"checkpoint {path} holds a non-finite head")
    return state


def latest_valid_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint that loads and verifies; unusable ones are reported, never deleted."""
    for _, path in list_step_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except ValueError as err:
            log.warning("skipping unusable checkpoint: %s", err)
    return None


def _migrate_v1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (before configs and checksums were stored): its identity held objective, K, setting, d."""
    identity = dict(state["identity"])
    config = {"objective.name": identity.pop("objective", None), "selmix.setting": identity.pop("setting", None)}
    return {**state, "format_version": FORMAT_VERSION, "identity": identity, "config": config, "checksum": None}


def check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume on data of another shape (number of classes, feature width)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"cannot resume from {path}: it was written with {key}={saved[key]!r}, "
                             f"the data has {key}={value!r}; use another run.dir")


class Checkpointer:
    """The checkpoints of one run: a step checkpoint every `every` steps (0: only when forced), found and
    verified at resume (`latest()`), pruned to the newest `keep` valid ones; and best.pt, the head with the
    best validation metric (`save_if_best`), whose record {metric, step, violation} is this part's own
    checkpointed state.
    """

    def __init__(self, run_dir: RunDir, keep: int, every: int = 0):
        self.run_dir = run_dir
        self.dir = run_dir.checkpoints
        self.keep, self.every = keep, every
        self.best: dict[str, Any] = {"metric": -math.inf, "step": -1, "violation": math.inf}
        self._verified: set[tuple[str, int, int]] = set()  # (name, size, mtime_ns) known to load

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        found = latest_valid_checkpoint(self.dir)
        if found is not None:
            self._remember(found[0])
        return found

    def any_present(self) -> bool:
        return bool(list_step_checkpoints(self.dir))

    def save(self, step: int, capture: Callable[[], dict[str, Any]], *, force: bool = False) -> Path | None:
        """Checkpoint `step` if it is due (a multiple of `every`) or `force`d (the run's end, a signal): called on
        every rank, `capture()` builds the body only then, rank 0 writes it, and the ranks meet after."""
        if not force and not (self.every and step % self.every == 0):
            return None
        path = self.write(capture())
        log.info("checkpoint: step %d → %s", step, path)
        dist.barrier()
        return path

    def save_if_best(self, step: int, metric: float, payload: Callable[[], dict[str, Any]], *,
                     violation: float = 0.0) -> dict[str, Any]:
        """Record the validation `metric` and constraint `violation` (≥ 0; 0: met, or no constraint) of the head
        at `step`. Heads compare by the smaller violation first, then the larger metric, the plug-in's order
        (core.plugin.constraint_violation): a head that comes closer to the constraint beats one that only scores
        higher. A new best (strictly better: ties keep the earlier step) writes best.pt,
        {step, metric, violation, **payload()}, on rank 0. Returns the best so far."""
        if (-violation, metric) > (-self.best["violation"], self.best["metric"]):
            self.best = {"metric": metric, "step": step, "violation": violation}
            self.run_dir.torch_save({"step": step, "metric": metric, "violation": violation, **payload()},
                                    self.best_path)
        return self.best

    def best_head(self, num_features: int, num_classes: int) -> torch.nn.Linear:
        """The head of best.pt, Linear(num_features → num_classes)."""
        return read_head(self.best_path, num_features, num_classes)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints from before constraints ranked best.pt carry no violation: their best counted as feasible.
        self.best = {"violation": 0.0, **state["best"]}

    def write(self, state: dict[str, Any]) -> Path:
        """Write `state` (rank 0) as step_<step>.pt with its checksum, then prune. Refuses a non-finite head."""
        bad = [k for k, t in state["head"].items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteStateError(f"the head's {bad} became non-finite by step {state['step']}; nothing was "
                                      "checkpointed (lower optim.lr, or check the features)")
        path = step_path(self.dir, state["step"])
        if self.run_dir.main:
            self.run_dir.torch_save({**state, "checksum": content_checksum(state)}, path)
            self._remember(path)
            self.prune()
        return path

    def _remember(self, path: Path) -> None:
        st = path.stat()
        self._verified.add((path.name, st.st_size, st.st_mtime_ns))

    def _valid(self, path: Path) -> bool:
        st = path.stat()
        if (path.name, st.st_size, st.st_mtime_ns) in self._verified:
            return True
        try:
            load_checkpoint(path)
        except ValueError:
            return False
        self._remember(path)
        return True

    def prune(self) -> None:
        """Keep the newest `keep` valid step checkpoints; remove every older one (never best.pt)."""
        found = list_step_checkpoints(self.dir)
        valid = 0
        for i, (_, path) in enumerate(found):
            valid += self._valid(path)
            if valid == self.keep:
                old = [p for _, p in found[i + 1:]]
                for p in old:
                    p.unlink(missing_ok=True)
                self.run_dir.forget(*old)
                return
