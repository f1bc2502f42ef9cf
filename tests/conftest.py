"""Shared pytest fixtures (keep each one small and documented; module-specific fixtures live in their tests).

Real data: all of CIFAR-10 as JPEG, ``cifar10/{train,test}/<class>/NNNN.jpg``, from the archive at
``$SELMIX_CIFAR10_TAR`` (default ``<repo>/../shared/data/cifar10-jpeg.tar.gz``), unpacked once into
``$SELMIX_CACHE_DIR`` (default ``<repo>/.cache/``) and reused by later sessions.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selmix_dist.data.archives import unpack_once

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar10_tar() -> Path:
    """Where the CIFAR-10 JPEG archive is expected (it may be absent)."""
    return Path(os.environ.get("SELMIX_CIFAR10_TAR", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


def cache_dir() -> Path:
    return Path(os.environ.get("SELMIX_CACHE_DIR", REPO / ".cache"))


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """CIFAR-10 root with ``train/`` and ``test/`` ImageFolders (skips, with the reason, if no archive)."""
    archive = cifar10_tar()
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {archive} (set SELMIX_CIFAR10_TAR)")
    return unpack_once(archive, cache_dir()) / "cifar10"


def _real_cifar10_sample(root: Path, per_class: int) -> bool:
    """Copy the first ``per_class`` test JPEGs of each class out of the archive (streamed; the test split
    comes first in it, so this reads only the first few MB). False when the archive is absent."""
    archive = cifar10_tar()
    if not archive.is_file():
        return False
    taken = dict.fromkeys(CIFAR10_CLASSES, 0)
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) >= 2 and parts[1] == "train":
                break
            if len(parts) != 4 or not member.isfile() or taken.get(parts[2], per_class) >= per_class:
                continue
            (root / parts[2]).mkdir(parents=True, exist_ok=True)
            (root / parts[2] / parts[3]).write_bytes(tar.extractfile(member).read())
            taken[parts[2]] += 1
    return min(taken.values()) == per_class


@pytest.fixture(scope="session")
def small_image_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 10 classes × 30 images, 32×32 JPEG: real CIFAR-10 test images when the archive is
    there, else seeded random images saved as JPEG quality 75 (the same layout and format)."""
    root = tmp_path_factory.mktemp("small_image_folder")
    if not _real_cifar10_sample(root, per_class=30):
        shutil.rmtree(root)
        root.mkdir()
        rng = np.random.default_rng(0)
        for name in CIFAR10_CLASSES:
            (root / name).mkdir()
            for i in range(30):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / name / f"{i:04d}.jpg", quality=75)
    return root


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of small problems (on a shared 2-core machine more only contend)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
