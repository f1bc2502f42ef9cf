"""Keep a training rank's private memory at what it holds: large freed buffers go back to the system.

A refresh allocates large temporaries (validation and pseudo-label batches, [B, K] float64 logits, K×K
gain buffers) batch after batch. glibc serves blocks below its mmap threshold from the heap and raises
that threshold (up to 32 MiB) each time a larger mapped block is freed, so those temporaries move into
the heap, fragment it and stay: at ImageNet-LT size one pseudo-label pass took a rank from 0.47 to 1.27 GB
of private memory (docs/benchmarks.md). The trainer therefore fixes the threshold at 1 MiB, so that every
large buffer is mapped and unmapped on free, and trims the heap after each refresh. Elsewhere than glibc
(musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

M_MMAP_THRESHOLD = -3          # mallopt parameter (glibc malloc.h)
LARGE_BLOCK = 1 << 20          # blocks from 1 MiB up are mapped: a page fault per 4 KiB, against a GEMM per batch


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Process-wide: blocks of at least `threshold` bytes are mmapped, so freeing one returns it at once
    (and glibc stops moving the threshold). True when the C library could (glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; True when the C library could (glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) >= 0)


def descendants(root: int) -> list[int]:
    """The pids of every living process below `root` (children, their children, ...), from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # comm (field 2) may hold spaces and parentheses: the fields after its last ')' are fixed.
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while being read
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of `pids` together, in MB: each page counted once, split among the processes
    that map it, so the sum is what those processes hold of the node's memory (page cache they only read
    through `pread` is in nobody's PSS). Processes that have ended count 0."""
    total_kb = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total_kb += sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return total_kb / 1024
