"""Checkpoints: atomic writes, discovery of the latest valid one, identity checks on resume.

A checkpoint is one `torch.save`d dict of plain tensors and Python values (loadable with
`weights_only=True`). It holds everything that decides the future of the run: head, optimizer and
scheduler state, objective multipliers, the current P and pseudo-labels, the gain history, the step, the
best validation metric and the run identity (objective, K, seed). Files are written to a temporary name
and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED_KEYS = ("format_version", "step", "identity", "head", "optimizer", "scheduler", "objective",
                 "refresh", "progress")


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def list_step_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and structurally validate one checkpoint; ValueError naming the file if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise many kinds of errors
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is not a selmix_dist checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {state['format_version']}, expected {FORMAT_VERSION}")
    return state


def latest_valid_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint that loads; unreadable ones are reported and skipped, never deleted."""
    for _, path in list_step_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
    return None


def check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run whose objective, number of classes or setting differ from the config."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise ValueError(f"cannot resume from {path}: it was written with {key}={saved.get(key)!r}, "
                             f"the config asks for {key}={value!r}; use another run.dir")


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest step checkpoints (never the best checkpoint)."""
    for _, path in list_step_checkpoints(ckpt_dir)[max(keep, 1):]:
        path.unlink(missing_ok=True)
