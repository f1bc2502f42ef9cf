"""A toy experiment for the runner tests: 4 classes of random 16×16 JPEGs packed as an archive, and an
experiment tree over it with a randomly initialised Lite0 at 32 px (fast, no weights needed)."""

from __future__ import annotations

import copy
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOY_CLASSES = ("ant", "bee", "cat", "dog")
TOY_TRAIN, TOY_TEST = 30, 6          # images per class


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):  # every module here fits small heads (fixture in tests/conftest.py)
    yield


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A folder holding toy.tar.gz with toy/{train,test}/<class>/NNN.jpg (seeded random pixels)."""
    root = tmp_path_factory.mktemp("toy_data")
    rng = np.random.default_rng(0)
    tree = root / "tree"
    for split, n in (("train", TOY_TRAIN), ("test", TOY_TEST)):
        for k, name in enumerate(TOY_CLASSES):
            folder = tree / "toy" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                # a class-dependent tint, so that heads can learn something
                pixels = rng.integers(0, 128, size=(16, 16, 3)) + 40 * np.eye(3, dtype=int)[k % 3]
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    with tarfile.open(root / "toy.tar.gz", "w:gz") as tar:
        tar.add(tree / "toy", arcname="toy")
    return root


TOY_EXPERIMENT = {
    "name": "toy",
    "data": {"archive": "toy.tar.gz", "train": "toy/train", "test": "toy/test"},
    "split": {"n1": 12, "rho_l": 4, "m1": 8, "n_val": 5},
    "features": {"weights": "none", "image_size": 32, "batch_size": 64},
    "seeds": [0, 1],
    "rho_u": [4, 1],
    "methods": {
        "erm": {"kind": "fit_head", "label": "ERM", "loss": "ce", "max_iter": 20},
        "tau_norm": {"kind": "tau_norm", "start": "erm", "taus": [0.0, 0.5, 1.0]},
        "st": {"kind": "self_train", "label": "self-training", "start": "erm", "steps": 5},
    },
}


@pytest.fixture
def toy_raw() -> dict:
    """A fresh copy of the toy experiment tree (tests may edit it)."""
    return copy.deepcopy(TOY_EXPERIMENT)
