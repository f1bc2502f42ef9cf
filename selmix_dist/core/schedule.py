"""Learning-rate schedules as factors of the base lr (pure functions of the step)."""

from __future__ import annotations

import math


def cosine_factor(step: int, total: int, start: int = 0) -> float:
    """0.5·(1 + cos(π·min(step − start, span)/span)) with span = max(total − start, 1): 1 at `start`, 0 at `total`."""
    span = max(total - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - start, span) / span))


class LrSchedule:
    """Factor of step t: linear warm-up over `warmup` steps, then cosine from 1 to 0 at `total` (or constant).

    A run extended to a new `total` (`run.extend_steps`) keeps this rule with the new total: the cosine is
    re-stretched over the whole run, so the lr steps up at the resume step to the value the longer run would
    have had there. It is built from the config at every start and never restored from a checkpoint
    (train.build.RunSchedule), so a resume always runs the current total.
    """

    def __init__(self, total: int, warmup: int = 0, constant: bool = False):
        self.total, self.warmup, self.constant = total, warmup, constant

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.constant:
            return 1.0
        return cosine_factor(step, self.total, self.warmup)
