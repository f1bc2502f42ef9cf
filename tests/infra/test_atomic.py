"""The one atomic-write helper: all or nothing, and stale temporaries of dead writers are swept."""

import os
import subprocess
import sys

import pytest

from selmix_dist import atomic


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_replaces_and_creates_parents(tmp_path):
    target = tmp_path / "x" / "y" / "b.bin"
    atomic.write_bytes(target, b"1")
    atomic.write_bytes(target, b"22")
    assert target.read_bytes() == b"22"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".step_00000010.pt.tmp-{dead_pid}"
    live = tmp_path / f".step_00000020.pt.tmp-{os.getpid()}"
    foreign = tmp_path / "notes.tmp-1"  # not our pattern (no leading dot): never touched
    for p in (stale, live, foreign):
        p.write_bytes(b"x")
    assert atomic.sweep_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])
