"""selmix_dist.memory: large freed buffers leave the process at once; freed heap blocks go back on trim."""

from __future__ import annotations

import os
import subprocess
import sys

# In a fresh process: put glibc where it gets by itself after a refresh's large frees (an mmap threshold above
# 8 MiB, so such blocks come from the heap, and no automatic trim), apply the trainer's setting ('map') or not,
# allocate and free 40 blocks of 8 MiB, trim the heap ('trim') or not; print the MiB still held.
_SCENARIO = """
import ctypes, ctypes.util, sys, torch
from selmix_dist.memory import M_MMAP_THRESHOLD, map_large_blocks, release_freed_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
assert libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1  # -1: M_TRIM_THRESHOLD
if sys.argv[1] == "map":
    assert map_large_blocks() is True
anon = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) / 1024
before = anon()
blocks = [torch.empty(2_000_000).fill_(1.0) for _ in range(40)]
del blocks
if sys.argv[1] == "trim":
    assert release_freed_memory() is True
print(anon() - before)
"""


def _kept_mib(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return float(proc.stdout.split()[-1])


def test_freed_blocks_stay_without_the_settings():
    assert _kept_mib("default") > 160       # the freed 320 MiB stay in the heap: the failure guarded against


def test_large_blocks_are_returned_when_freed():
    assert _kept_mib("map") < 16            # with the trainer's setting they leave at once


def test_release_returns_freed_heap_blocks():
    assert _kept_mib("trim") < 16           # and the trim after a refresh returns what the heap kept
