"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning before the time limit, torch elastic's stop) / SIGINT
(Ctrl-C) at any time.

`Preemption.install()` runs at process start. Until the training loop is ready, a signal ends the process
at once (there is no step boundary newer than the last checkpoint to save), after asking SLURM to requeue
the job: with exit code 0 when it runs alone, else 128 + the signal's number, so that the launcher's agent
sees the rank fail and stops the others (a rank that exited 0 would leave them waiting for it in their
first collective). "At once" includes a main thread that waits in C++ for a peer that died (the process
group's rendezvous waits up to its timeout, and a Python handler runs only when that returns): the
set-up watcher thread ends such a process `SET_UP_GRACE_S` after the signal.

Once the loop runs (`arm()`), a signal only sets a flag; `requested()` is a collective over ranks that the
loop calls every `run.signal_poll_every` steps and the refresh after every batch of its passes, so the
checkpoint of the latest step boundary follows within one batch or a few steps.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from selmix_dist import distributed as dist

log = logging.getLogger(__name__)
# SIGINT too: as a KeyboardInterrupt it lost the steps since the last checkpoint, and in a forked rank torch
# elastic's wrapper swallows a KeyboardInterrupt and exits 0 without an exit code for the agent, which then waits
# for that rank forever.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# How long the set-up watcher lets the main thread end the process itself (its handler exits cleanly:
# `finally` blocks run, the run lock is released) before ending it from the watcher. Well under the 30 s
# after which torch elastic's agent SIGKILLs a rank it asked to stop.
SET_UP_GRACE_S = 3.0


class Preemption:
    def __init__(self, requeue: bool):
        self.requeue_enabled = requeue
        self.received: list[int] = []
        self.armed = False
        self._previous: dict[int, object] = {}
        self._requeued = False
        self._watcher: _SetUpWatcher | None = None

    def install(self) -> Preemption:
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        self._watcher = _SetUpWatcher(self._end_set_up)
        return self

    def arm(self) -> None:
        """From now on a signal is handled at the next poll (the loop can checkpoint)."""
        self.armed = True
        self._stop_watching()

    def _handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if not self.armed:
            self._end_set_up(signum, sys.exit)

    def _end_set_up(self, signum: int, exit_with) -> None:
        log.warning("%s received during set-up: nothing new to checkpoint, exiting", signal.Signals(signum).name)
        self.requeue()
        exit_with(0 if int(os.environ.get("WORLD_SIZE", "1")) == 1 else 128 + signum)

    def requested(self) -> bool:
        """Collective: True on every rank when any rank has received a signal."""
        return dist.any_rank(bool(self.received))

    def requeue(self) -> None:
        """`scontrol requeue $SLURM_JOB_ID` from rank 0 when run.requeue=true under SLURM."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue_enabled and job and dist.is_main_process() and not self._requeued:
            self._requeued = True  # the handler and the set-up watcher may both get here
            log.info("requeueing SLURM job %s", job)
            subprocess.run(["scontrol", "requeue", job], check=False)

    def uninstall(self) -> None:
        self._stop_watching()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None


class _SetUpWatcher:
    """A thread that ends the process `SET_UP_GRACE_S` after one of `SIGNALS`, unless stopped first.

    Python's C-level handler writes each signal's number to the wakeup fd as it arrives, whatever the main
    thread is doing; the Python-level handler waits until the main thread is back in the interpreter, which
    in set-up may be never (a rendezvous or store wait for a rank that died; seen in CI: a rank SIGTERMed
    by the agent was SIGKILLed 30 s later). `end(signum, _exit_now)` then ends the process from here.
    """

    def __init__(self, end):
        self._end = end
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # the C handler must never block on a full pipe
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="selmix_dist set-up signals", daemon=True).start()

    def _watch(self) -> None:
        while data := os.read(self._read, 64):  # b"": stop() closed the write end
            # Other signals with Python handlers (the DataLoader's SIGCHLD) write here too.
            ours = [s for s in data if s in SIGNALS]
            if ours and not self._stopped.wait(SET_UP_GRACE_S):
                self._end(ours[0], _exit_now)
        os.close(self._read)

    def stop(self) -> None:
        self._stopped.set()
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)


def _exit_now(code: int) -> None:
    """os._exit after flushing what was said: it skips the interpreter's shutdown, which flushes."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
