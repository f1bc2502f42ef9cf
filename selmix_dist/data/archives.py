"""Dataset archives (``<name>.tar.gz``) unpacked once into a cache directory and shared by every later run.

``unpack_once(cache/../x.tar.gz, cache)`` gives ``cache/x`` with a ``.unpacked`` marker inside. Extraction goes
to a temporary directory that is renamed into place with its marker already written, so a crashed or
concurrent run never leaves a half-unpacked directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from selmix_dist import atomic

MARKER = ".unpacked"
SUFFIX = ".tar.gz"


def unpacked_name(archive: str | Path) -> str:
    """The directory an archive unpacks into: its file name without ``.tar.gz``."""
    name = Path(archive).name
    if not name.endswith(SUFFIX) or name == SUFFIX:
        raise ValueError(f"archive {archive} is not a <name>{SUFFIX} file")
    return name.removesuffix(SUFFIX)


def unpack_once(archive: str | Path, cache: str | Path) -> Path:
    """Unpack ``archive`` into ``cache/<archive name without .tar.gz>`` unless a complete copy (one with the
    ``.unpacked`` marker) is there; return that directory. The marker records the archive's name and size."""
    archive, cache = Path(archive), Path(cache)
    target = cache / unpacked_name(archive)
    if (target / MARKER).is_file():
        return target
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    if target.exists():
        raise FileExistsError(f"{target} exists without its {MARKER} marker (an incomplete copy not written "
                              "by unpack_once?); move it away to unpack the archive again")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    tmp.chmod(0o755)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        atomic.write_text(tmp / MARKER, f"{archive.name} {archive.stat().st_size}\n")
        try:
            # A directory rename (atomic within one filesystem); atomic.py only handles files.
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent run that finished first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
