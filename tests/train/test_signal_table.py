"""The signal table of docs/distributed.md: each launcher, a signal to the launcher process only.

The SLURM row is tests/train/test_slurm.py (SIGUSR1 to every process of the step, both launchers); forked
SIGTERM with an exact resume is tests/train/test_launchers.py.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from signal_table import signal_launcher, write_cache  # noqa: E402

# (launcher, signal): (exit code, a checkpoint written, ranks left running without their launcher). One case per
# launcher and mechanism (about 15 s each on 2 cores): the single process's SIGTERM / SIGUSR1 are the same handler
# as its SIGINT, torchrun's SIGINT is accelerate's (both are torch elastic's agent).
TABLE = {
    ("single", signal.SIGINT): (0, True, 0),
    ("forked", signal.SIGUSR1): (128 + signal.SIGUSR1, True, 0),
    ("forked", signal.SIGINT): (128 + signal.SIGINT, True, 0),  # no checkpoint at HEAD 9f49e65 (KeyboardInterrupt)
    ("accelerate", signal.SIGTERM): (128 + signal.SIGTERM, True, 0),
    ("accelerate", signal.SIGUSR1): (-signal.SIGUSR1, False, 2),  # why the SLURM script traps USR1
    ("torchrun", signal.SIGTERM): (1, True, 0),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signal_cache")
    write_cache(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "signum"), list(TABLE), ids=[f"{a}-{s.name}" for a, s in TABLE])
def test_a_signal_to_the_launcher(cache, tmp_path, launcher, signum):
    rc, checkpoint, orphans = TABLE[launcher, signum]
    row = signal_launcher(launcher, signum, tmp_path / "run", cache)
    assert (row["rc"], bool(row["checkpoints"]), row["orphaned_ranks"]) == (rc, checkpoint, orphans), row
    assert not row["forcefully_killed"], row["stderr_tail"]
