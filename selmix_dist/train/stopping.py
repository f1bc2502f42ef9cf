"""Why the training loop ends, decided in one place and identically on every rank.

    COMPLETED   the step budget run.steps is spent
    EARLY_STOP  the max gain is stable over run.early_stop_window refreshes (docs/method.md §4.3); only with
                run.early_stop and pairs that follow the gain (not selmix.uniform)
    SIGNAL      SIGTERM / SIGUSR1 reached some rank: polled every run.signal_poll_every steps (the refresh's
                passes poll too, and raise evaluator.Interrupted)

and the one way to fail: a non-finite training loss, remembered on the device at every step and raised at the
next poll, so that no step waits for the host.
"""

from __future__ import annotations

import torch

from selmix_dist import distributed as dist
from selmix_dist.config import RunConfig
from selmix_dist.core import GainConvergence
from selmix_dist.train.checkpointer import NonFiniteStateError
from selmix_dist.train.preemption import Preemption

COMPLETED, EARLY_STOP, SIGNAL = "completed", "early_stop", "signal"


class Stopping:
    """The stop rules of one run; `convergence` (the max-gain history) is a checkpointed part of the run."""

    def __init__(self, run: RunConfig, *, gain_guided: bool, preemption: Preemption, lr: float,
                 device: torch.device):
        self.steps, self.poll_every = run.steps, run.signal_poll_every
        self.early_stop = run.early_stop and gain_guided
        self.preemption, self.lr = preemption, lr
        # Kept whether or not early stopping is on: the history is logged and checkpointed either way.
        self.convergence = GainConvergence(window=run.early_stop_window, rel_tol=run.early_stop_tol)
        self._bad_loss_step = torch.tensor(-1, device=device)  # first step with a non-finite loss (−1: none)

    def after_refresh(self, max_gain: float) -> str | None:
        """EARLY_STOP when the gain history has converged (rank 0's decision, broadcast: one answer everywhere)."""
        converged = self.convergence.update(max_gain)
        if self.early_stop and bool(dist.broadcast_object(converged)):
            return EARLY_STOP
        return None

    def before_step(self, step: int) -> str | None:
        """COMPLETED once `step` steps are done."""
        return COMPLETED if step >= self.steps else None

    def note_loss(self, step: int, loss: torch.Tensor) -> None:
        """Remember `step` if its loss (a 0-d tensor on the device) is the first non-finite one (no sync)."""
        self._bad_loss_step = torch.where((self._bad_loss_step < 0) & ~torch.isfinite(loss), step,
                                          self._bad_loss_step)

    def after_step(self, step: int) -> str | None:
        """At a poll (`step` steps done, a multiple of run.signal_poll_every; a collective): raise on a
        non-finite loss, SIGNAL when any rank was signalled."""
        if step % self.poll_every:
            return None
        self.check_finite_loss()
        return SIGNAL if self.preemption.requested() else None

    def check_finite_loss(self) -> None:
        bad = int(self._bad_loss_step)
        if bad >= 0:
            raise NonFiniteStateError(f"the training loss became non-finite at step {bad} (lr {self.lr:g}); the "
                                      "run stopped without checkpointing it. Lower optim.lr or check the features; "
                                      "resume=auto restarts from the last checkpoint")
