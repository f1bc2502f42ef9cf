"""Feature extraction that survives a second extraction into the same cache and a kill -9 midway."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.feature_cache import write_feature_cache

REPO = Path(__file__).resolve().parents[2]
LABELS = torch.arange(96) % 4


def _rows(positions: torch.Tensor) -> torch.Tensor:
    return torch.stack([positions.float().sin(), positions.float().cos(), positions.float()], dim=1)


def _files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache but the writer's lock, by relative path."""
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.name != ".writer.lock"}


@contextlib.contextmanager
def writing(cache: Path, split: str = "train") -> Iterator[None]:
    """Inside: another thread is extracting `split` into `cache`, holding its writer lock, paused in its first
    chunk; on exit it finishes."""
    started, release = threading.Event(), threading.Event()

    def slow_rows(positions: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(60)
        return _rows(positions)

    first = threading.Thread(target=write_feature_cache, args=(cache, split, LABELS, slow_rows, 3),
                             kwargs=dict(chunk_size=32))
    first.start()
    assert started.wait(60)
    try:
        yield
    finally:
        release.set()
        first.join(60)


def test_a_second_extraction_into_a_cache_being_written_is_refused(tmp_path):
    cache = tmp_path / "cache"
    with writing(cache):
        refused = rf"{cache} is being written by another extraction \(it holds {cache}/\.writer\.lock"
        with pytest.raises(ValueError, match=refused):
            write_feature_cache(cache, "val", LABELS, _rows, 3, chunk_size=32)
    write_feature_cache(tmp_path / "clean", "train", LABELS, _rows, 3, chunk_size=32)
    assert _files(cache) == _files(tmp_path / "clean")  # the refused one wrote nothing


def test_a_complete_split_opens_while_another_extraction_writes_the_cache(tmp_path):
    # Three experiment processes open one finished cache at once (each calls extract_features, a no-op): found
    # when tools/reproduce.py ran one process per seed. Only writers exclude each other.
    cache = tmp_path / "cache"
    write_feature_cache(cache, "val", LABELS, _rows, 3, chunk_size=32)
    with writing(cache):
        stats = write_feature_cache(cache, "val", LABELS, _rows, 3, chunk_size=32)
    assert stats.noop


EXTRACT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from helpers.feature_cache import write_feature_cache
from test_extract_safety import LABELS, _rows

def slow(positions):
    time.sleep(0.4)
    return _rows(positions)

write_feature_cache({cache!r}, "train", LABELS, slow, 3, chunk_size=8)
"""


@pytest.mark.slow
def test_an_extraction_killed_midway_and_rerun_equals_a_clean_one_byte_for_byte(tmp_path):
    cache = tmp_path / "cache"
    script = EXTRACT.format(tests=str(REPO / "tests"), cache=str(cache))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests" / "features")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO)
    deadline = time.time() + 120
    while len(list((cache / "train").glob("chunk-*.safetensors"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    written = len(list((cache / "train").glob("chunk-*.safetensors")))
    assert 3 <= written < 12, written  # killed midway: some chunks on disk, not all
    stats = write_feature_cache(cache, "train", LABELS, _rows, 3, chunk_size=8)
    assert stats.chunks_skipped >= 3 and stats.chunks_written + stats.chunks_skipped == 12
    write_feature_cache(tmp_path / "clean", "train", LABELS, _rows, 3, chunk_size=8)
    assert _files(cache) == _files(tmp_path / "clean")


def test_a_corrupt_jpeg_and_a_non_image_are_refused_naming_row_and_file(tmp_path):
    """tools/make_lt_split.py reads labels only (decoding every image of an ImageNet-size folder is the
    extraction's work), so both files are in the lists; the extraction then stops at the first batch holding
    one, naming the split, its row and the file, in one line (not a DataLoader worker's traceback), and keeps
    the chunks before it. Skipping would leave the cache without rows its list names."""
    import numpy as np
    from PIL import Image

    from selmix_dist.data.splits import SPLIT_NAMES, load_split, make_lt_split, open_split_source
    from selmix_dist.features.backbones import build_backbone
    from selmix_dist.features.cache import extract_features

    rng, root = np.random.default_rng(0), tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    good = (root / "a" / "3.jpg").read_bytes()
    (root / "a" / "3.jpg").write_bytes(good[: len(good) // 3])  # a truncated JPEG
    (root / "b" / "5.jpg").write_text("not an image\n")
    from selmix_dist.data.sources import ImageFolderSource

    make_lt_split(ImageFolderSource(root), tmp_path / "split", n1=6, rho_l=1, m1=0, rho_u=1, n_val=1, n_test=1,
                  seed=0)
    lists = {name: load_split(tmp_path / "split", name).items for name in SPLIT_NAMES}
    broken = {"a/3.jpg", "b/5.jpg"}
    assert broken <= {item for items in lists.values() for item in items}  # listed: nothing dropped silently
    backbone, named = build_backbone("test_resnet", "none", seed=1, image_size=32), set()
    for name, items in lists.items():
        rows = [row for row, item in enumerate(items) if item in broken]
        if not rows:
            continue
        source = open_split_source(tmp_path / "split", name)
        split = load_split(tmp_path / "split", name, source)
        with pytest.raises(ValueError) as err:
            extract_features(source, split.items, split.labels, backbone, tmp_path / "cache", name, batch_size=2,
                             chunk_size=2, num_workers=1, progress=False, split_sha256=split.sha256)
        message, chunk = str(err.value), rows[0] - rows[0] % 2
        assert "\n" not in message and message.startswith(f"split {name!r}: 1 image(s) of chunk [{chunk}, {chunk + 2})")
        assert f"row {rows[0]}: cannot decode image {root / items[rows[0]]}" in message
        named.add(items[rows[0]])
        assert len(list((tmp_path / "cache" / name).glob("chunk-*"))) == chunk // 2  # the chunks before it kept
    assert named == broken  # seed 0 puts the two files in different lists: each is named
