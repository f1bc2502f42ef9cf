"""Learning-rate schedules as factors of the base lr (pure functions of the step)."""

from __future__ import annotations

import math
from typing import Any


def cosine_factor(step: int, total: int, start: int = 0) -> float:
    """0.5·(1 + cos(π·min(step − start, span)/span)) with span = max(total − start, 1): 1 at `start`, 0 at `total`."""
    span = max(total - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - start, span) / span))


class LrSchedule:
    """Factor of step t: linear warm-up over `warmup` steps, then cosine to 0 at `total` (or constant).

    `extend(step, total)` makes a longer run continue smoothly: from the factor it has at `step`, a cosine
    to 0 at the new `total` (the rule behind `run.extend_steps`). Its state is checkpointed.
    """

    def __init__(self, total: int, warmup: int = 0, constant: bool = False):
        self.total, self.warmup, self.constant = total, warmup, constant
        self.restart: tuple[int, float] | None = None  # (step, factor) where the last extension began

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.constant:
            return 1.0
        start, factor = self.restart or (self.warmup, 1.0)
        return factor * cosine_factor(step, self.total, start)

    def extend(self, step: int, total: int) -> None:
        if not self.constant:
            self.restart = (step, self(step))
        self.total = total

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "warmup": self.warmup, "constant": self.constant, "restart": self.restart}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.warmup, self.constant = state["total"], state["warmup"], state["constant"]
        self.restart = tuple(state["restart"]) if state["restart"] is not None else None
