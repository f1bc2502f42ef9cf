"""A signal in set-up ends the process at once, even while its main thread waits in C++ for a peer."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

# A rank in set-up: handlers installed, then the main thread waits for a key no peer will ever set (a process
# group's rendezvous with a rank that died). A Python-level handler alone runs only when the wait times out.
WAITING_RANK = textwrap.dedent("""
    import datetime, os, signal, sys, threading, time
    import torch.distributed as td
    from selmix_dist.train.preemption import Preemption

    preemption = Preemption(requeue=False).install()
    store = td.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds={timeout}))
    {before_wait}
    print("waiting", flush=True)
    WAIT_LINE = sys._getframe().f_lineno + 1
    store.get("the peer's key")
    print("the wait returned", flush=True)
""")

# Sends the signal from inside the rank once its main thread is in the wait (on WAIT_LINE, then half a second
# more): sent from outside, it could arrive just before the wait, where the Python handler runs at once (seen
# in CI), and the test would not show what happens in the wait.
SIGNAL_IN_THE_WAIT = textwrap.dedent("""
    def signal_in_the_wait(main=threading.main_thread().ident):
        while sys._current_frames()[main].f_lineno != globals().get("WAIT_LINE"):
            time.sleep(0.01)
        time.sleep(0.5)
        print("sent", time.monotonic(), flush=True)
        os.kill(os.getpid(), {signum})
    threading.Thread(target=signal_in_the_wait, daemon=True).start()
""")


def _start(before_wait: str = "", timeout: int = 120, world_size: str = "2") -> subprocess.Popen:
    code = WAITING_RANK.format(timeout=timeout, before_wait=before_wait)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"WORLD_SIZE": world_size, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline() == "waiting\n", proc.communicate(timeout=60)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_to_a_rank_blocked_in_set_up_ends_it_within_the_grace_period(signum):
    from selmix_dist.train.preemption import SET_UP_GRACE_S

    proc = _start(SIGNAL_IN_THE_WAIT.format(signum=int(signum)))
    sent_line = proc.stdout.readline()
    assert sent_line.startswith("sent "), proc.communicate(timeout=60)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - float(sent_line.split()[1])  # CLOCK_MONOTONIC: one clock for both processes
    assert proc.returncode == 128 + signum, err
    assert f"{signal.Signals(signum).name} received during set-up" in err  # flushed before os._exit
    # The store's timeout is 120 s: ending before it, after the grace period, means the watcher ended it.
    assert SET_UP_GRACE_S - 0.5 < took < 60, took


def test_alone_a_signal_in_set_up_exits_0_as_before():
    proc = _start(world_size="1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_once_armed_a_signal_only_sets_the_flag():
    """After arm() the watcher is gone: the process lives on and its wait ends by the store's timeout."""
    proc = _start(before_wait="preemption.arm(); os.kill(os.getpid(), signal.SIGTERM)", timeout=6)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "timeout" in err.lower(), err  # the store's error, not a signal's exit
    assert "the wait returned" not in out


def test_a_signal_while_the_main_thread_runs_python_exits_through_its_handler():
    """The clean path: the handler's sys.exit runs `finally` blocks; the watcher does not cut it short."""
    code = textwrap.dedent("""
        import os, signal, time
        from selmix_dist.train.preemption import Preemption
        Preemption(requeue=False).install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            print("finally ran", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 128 + signal.SIGTERM and proc.stdout == "finally ran\n", proc.stderr
