"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning before the time limit, torch elastic's stop) / SIGINT
(Ctrl-C) at any time.

`Preemption.install()` runs at process start. Until the training loop is ready, a signal ends the process
at once (there is no step boundary newer than the last checkpoint to save), after asking SLURM to requeue
the job: with exit code 0 when it runs alone, else 128 + the signal's number, so that the launcher's agent
sees the rank fail and stops the others (a rank that exited 0 would leave them waiting for it in their
first collective). Once the loop runs (`arm()`), a signal only sets a flag; `requested()` is a
collective over ranks that the loop calls every `run.signal_poll_every` steps and the refresh after every
batch of its passes, so the checkpoint of the latest step boundary follows within one batch or a few steps.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from selmix_dist import distributed as dist

log = logging.getLogger(__name__)
# SIGINT too: as a KeyboardInterrupt it lost the steps since the last checkpoint, and in a forked rank torch
# elastic's wrapper swallows a KeyboardInterrupt and exits 0 without an exit code for the agent, which then waits
# for that rank forever.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self, requeue: bool):
        self.requeue_enabled = requeue
        self.received: list[int] = []
        self.armed = False
        self._previous: dict[int, object] = {}

    def install(self) -> Preemption:
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def arm(self) -> None:
        """From now on a signal is handled at the next poll (the loop can checkpoint)."""
        self.armed = True

    def _handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if not self.armed:
            log.warning("%s received during set-up: nothing new to checkpoint, exiting",
                        signal.Signals(signum).name)
            self.requeue()
            sys.exit(0 if int(os.environ.get("WORLD_SIZE", "1")) == 1 else 128 + signum)

    def requested(self) -> bool:
        """Collective: True on every rank when any rank has received a signal."""
        return dist.any_rank(bool(self.received))

    def requeue(self) -> None:
        """`scontrol requeue $SLURM_JOB_ID` from rank 0 when run.requeue=true under SLURM."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue_enabled and job and dist.is_main_process():
            log.info("requeueing SLURM job %s", job)
            subprocess.run(["scontrol", "requeue", job], check=False)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
