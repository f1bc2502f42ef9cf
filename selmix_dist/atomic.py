"""Atomic file writes: the one place that writes a temporary file and renames it over the target.

A reader (or a process restarted after a crash) sees either the previous file or the complete new one,
never a torn write. Temporaries are named `.<name>.tmp-<pid>` in the target's directory (a rename is only
atomic within one filesystem); `sweep_stale_temporaries` removes the ones whose writer has died.

A write that the storage refuses (disk full, read-only filesystem, no permission) raises `StorageError`, one
message naming the file, the reason and the free space, after the temporary is removed: the previous file,
if any, is intact and nothing half-written remains.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


class StorageError(OSError):
    """The storage refused a write (full, read-only, no permission); the message names the file and what to do."""


def _free_space(path: Path) -> str:
    """Free space on the filesystem of `path` (its nearest existing ancestor), e.g. '1.2 MiB free'."""
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    if folder is None:
        return "free space unknown"
    free = shutil.disk_usage(folder).free
    return f"{free / 2**20:.1f} MiB free" if free >= 2**20 else f"{free // 1024} KiB free"


@contextlib.contextmanager
def reported(path: str | Path) -> Iterator[None]:
    """Turn an OSError of writing `path` into a StorageError naming it (already-reported errors pass through)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        path = Path(path)
        reason = err.strerror or str(err)
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        if full:  # how much is left tells whether a retry can succeed
            reason += f" ({_free_space(path.parent)} on its filesystem)"
        hint = ("free space (or choose a directory on a larger filesystem) and run again" if full else
                "the filesystem is mounted read-only: choose a writable directory" if err.errno == errno.EROFS else
                "check the directory's permissions and the filesystem")
        error = StorageError(f"cannot write {path}: {reason}; {hint}")
        error.errno = err.errno
        raise error from err


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsync'd and renamed onto `path`, on error removed.

    OSErrors of the write become `StorageError` naming `path` (module doc)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with reported(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            # Whatever sits at our temporary name (a link planted there, a leftover of a reused PID) goes, so
            # the writer creates a new regular file instead of writing through a link.
            tmp.unlink(missing_ok=True)
            yield tmp
            if tmp.is_file():
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.is_file():
            with contextlib.suppress(OSError):  # never hide the write's own error
                tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # Through a Python file object, so that a full disk raises OSError(ENOSPC) instead of torch's
        # "basic_ios::clear: iostream error" RuntimeError, which names neither the file nor the cause.
        torch.save(obj, fh)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` files of dead writers in `directory` (not recursive); return them.

    Only this module's naming pattern is touched, and only when the writing process no longer exists on
    this host, so a concurrent writer's temporary survives.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_file() and not pid_alive(int(m.group("pid"))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
