"""A full or read-only disk: one `error:` line naming the file (and the free space), exit 2, nothing half-written,
and a run that resumes once space is freed (issue 19; each case failed before the fix).

The filesystems are real: a 1 MiB tmpfs filled up to a few KiB, and a tmpfs remounted read-only (the tests
skip, saying why, where mounting is not permitted). `test_a_failed_save_*` simulates ENOSPC without a mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
from test_containment import cache as cache  # noqa: E402,F401 - the module fixture, shared
from test_containment import digest, one_error_line, train  # noqa: E402

from selmix_dist import atomic  # noqa: E402


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path, leave_kib: int) -> Path:
    """A file that leaves `leave_kib` KiB free on `folder`'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (shutil.disk_usage(folder).free - leave_kib * 1024))
    return filler


def step_heads(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "step_00000020.pt", weights_only=True)
    return state["head"]


def test_a_full_disk_is_one_error_line_and_the_run_resumes_once_space_is_freed(cache, tmp_path):
    """Before: three tracebacks ending in `RuntimeError: basic_ios::clear: iostream error` (the checkpoint's
    torch.save, then Monitor.close saving distribution_last.pt), exit 1, no `error:` line."""
    reference = tmp_path / "reference"
    assert train(cache, reference).returncode == 0
    with tmpfs(tmp_path / "small", "1m") as small:
        filler = fill(small, leave_kib=64)  # the run needs about 300 KiB: it fails after its first files
        run = small / "run"
        line = one_error_line(train(cache, run))
        assert line.startswith(f"error: cannot write {run}/") and "No space left on device" in line, line
        assert "KiB free on its filesystem" in line
        assert not [p for p in run.rglob("*") if ".tmp-" in p.name]  # nothing half-written stays
        assert not (run / ".lock").exists()  # the lock went with the failed run
        filler.unlink()
        again = train(cache, run)
        assert again.returncode == 0, again.stderr[-3000:]
        for key, value in step_heads(reference).items():
            assert torch.equal(step_heads(run)[key], value), key


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """ENOSPC simulated inside torch.save (half the bytes written, then the device is full)."""
    target = tmp_path / "checkpoints" / "step.pt"
    atomic.torch_save({"x": torch.zeros(3)}, target)
    previous = target.read_bytes()
    real_save = torch.save

    def full_after_some_bytes(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_after_some_bytes)
    with pytest.raises(atomic.StorageError) as raised:
        atomic.torch_save({"x": torch.ones(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(raised.value)
    assert message.startswith(f"cannot write {target}: No space left on device (")
    assert "free on its filesystem" in message
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == previous and sorted(os.listdir(target.parent)) == ["step.pt"]


def test_a_read_only_run_dir_is_one_error_line_and_a_finished_run_still_reports(cache, tmp_path):
    """Before: `OSError: [Errno 30] Read-only file system` tracebacks from mkdir and from the lock's open()."""
    with tmpfs(tmp_path / "ro", "4m") as ro:
        done = ro / "done"
        assert train(cache, done).returncode == 0
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = digest(done)
        line = one_error_line(train(cache, ro / "new"))
        assert line.startswith(f"error: cannot write {ro / 'new'}: Read-only file system"), line
        line = one_error_line(train(cache, done, "run.steps=30", "run.extend_steps=true"))
        assert line.startswith(f"error: cannot write {done / '.lock'}: Read-only file system"), line
        finished = train(cache, done)  # the same config: nothing to write, nothing refused
        assert finished.returncode == 0 and "already complete" in finished.stderr, finished.stderr[-3000:]
        assert digest(done) == before


def test_a_run_dir_whose_parents_do_not_exist_is_created(cache, tmp_path):
    run = tmp_path / "a" / "b" / "run"
    proc = train(cache, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "run.json").is_file() and (run / "checkpoints" / "step_00000020.pt").is_file()
