"""selmix_dist.memory: large freed buffers leave the process at once; freed heap blocks go back on trim."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import torch

from selmix_dist.memory import M_MMAP_THRESHOLD, release_freed_memory

M_TRIM_THRESHOLD = -1   # mallopt parameter (malloc.h)
GLIBC_INITIAL = 128 << 10


def _anon_mib() -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"))


# In a fresh process: free one 24 MiB block (glibc then raises its mmap threshold above 8 MiB by itself, as
# after a refresh's buffers), then allocate and free 40 blocks of 8 MiB; print the MiB still held.
_SCENARIO = """
import sys, torch
from selmix_dist.memory import map_large_blocks
if sys.argv[1] == "map":
    assert map_large_blocks() is True
anon = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) / 1024
big = torch.empty(6_000_000).fill_(1.0)
del big
before = anon()
blocks = [torch.empty(2_000_000).fill_(1.0) for _ in range(40)]
del blocks
print(anon() - before)
"""


def _kept_mib(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return float(proc.stdout.split()[-1])


def test_large_blocks_are_returned_when_freed():
    assert _kept_mib("default") > 48        # glibc's own behaviour: freed blocks stay in the heap (76-305 MiB)
    assert _kept_mib("map") < 16            # with the trainer's setting they leave at once


def test_release_returns_freed_heap_blocks():
    libc = _libc()
    try:
        assert libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
        blocks = [torch.empty(2_000_000).fill_(1.0) for _ in range(40)]   # 8 MiB heap blocks
        del blocks
        kept = _anon_mib()
        assert release_freed_memory() is True   # glibc (Linux)
        assert kept - _anon_mib() > 160, kept   # most of the 320 MiB freed
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_INITIAL)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_INITIAL)
