"""An exclusive lock on a run directory, held by rank 0 for the life of the run.

Two mechanisms, because run directories often live on filesystems shared by several nodes:
- `flock` on the lock file, where the filesystem supports it (local disks, most NFSv4 / Lustre setups);
- the lock file's content names the holder (host, PID, start time), and the holder touches the file every
  `HEARTBEAT_SECONDS`. A lock of this host whose PID is gone is stale; a lock of another host is stale once
  its heartbeat is older than `stale_after` seconds (we cannot ask another host whether a PID lives).
A stale lock is reported and taken over; a live one refuses the second run with a message naming it.
The lock file is opened with O_NOFOLLOW: a symlink planted at its name is refused, never written through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from selmix_dist.atomic import pid_alive, reported

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 30.0


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """`acquire()` or raise `RunLockedError`; `release()` removes the lock file (idempotent)."""

    def __init__(self, path: str | Path, stale_after: float = 600.0):
        self.path = Path(path)
        self.stale_after = stale_after
        self._fh = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the recorded holder is dead, or None if it may be alive."""
        host, pid = holder.get("host"), int(holder.get("pid", -1))
        if host == socket.gethostname():
            return None if pid_alive(pid) else f"process {pid} on {host} no longer exists"
        age = time.time() - self.path.stat().st_mtime
        if age > self.stale_after:
            return f"its heartbeat is {age:.0f} s old (> run.lock_stale_seconds={self.stale_after:g})"
        return None

    def _open(self):
        """The lock file for reading and writing, created if absent; never through a symlink."""
        with reported(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise
                raise ValueError(f"lock file {self.path} is a symbolic link (to {os.readlink(self.path)!r}): a lock "
                                 "is never taken through a link, which would overwrite its target; remove the "
                                 "link, or use another run.dir") from None
        return os.fdopen(fd, "r+")

    def acquire(self) -> None:
        fh = self._open()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunLockedError(self._refusal(self.holder())) from None
        except OSError:  # flock not supported here: the content and heartbeat decide alone
            pass
        holder = self.holder()
        if holder is not None:
            reason = self._stale_reason(holder)
            if reason is None:
                fh.close()
                raise RunLockedError(self._refusal(holder))
            log.warning("taking over a stale lock %s held by %s: %s", self.path, _describe(holder), reason)
        try:
            with reported(self.path):
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
                fh.flush()
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _refusal(self, holder: dict | None) -> str:
        who = _describe(holder) if holder else "another process (flock held)"
        return (f"run directory {self.path.parent} is in use by {who} (lock file {self.path}); wait for it to "
                "finish, or use another run.dir. If that process is dead on another host, the lock is taken over "
                "once its heartbeat is older than run.lock_stale_seconds")

    def release(self) -> None:
        if self._fh is None:
            return
        self._stop.set()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"PID {holder.get('pid')} on host {holder.get('host')} (since {since})"
