"""selmix_dist.memory: large freed buffers leave the process at once; freed heap blocks go back on trim."""

from __future__ import annotations

import os
import signal
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


# A process that fills 64 MiB with data, then forks: parent and child map the same 64 MiB until either writes.
_FORKED_BLOCK = """
import os, sys, time
block = bytes(range(256)) * (1 << 18)
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def _rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_descendants_and_pss_count_a_shared_block_once():
    from selmix_dist.memory import descendants, pss_mb

    parent = subprocess.Popen([sys.executable, "-c", _FORKED_BLOCK], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert descendants(os.getpid()) == sorted([parent.pid, child])
        assert descendants(parent.pid) == [child] and descendants(child) == []
        assert min(_rss_mib(parent.pid), _rss_mib(child)) > 64   # each maps the whole block...
        both, alone = pss_mb([parent.pid, child]), pss_mb([parent.pid])
        assert both - alone < 0.75 * 64 < both                    # ...which counts once: half of it each
        assert _rss_mib(parent.pid) - 64 < alone < _rss_mib(parent.pid) - 24
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert pss_mb([parent.pid]) == 0.0                            # ended processes count nothing
