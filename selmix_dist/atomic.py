"""Atomic file writes: the one place that writes a temporary file and renames it over the target.

A reader (or a process restarted after a crash) sees either the previous file or the complete new one,
never a torn write. Temporaries are named `.<name>.tmp-<pid>` in the target's directory (a rename is only
atomic within one filesystem); `sweep_stale_temporaries` removes the ones whose writer has died.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsync'd and renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists() and tmp.is_file():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
