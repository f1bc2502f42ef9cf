"""Reduced real-data runs of the experiment files (slow): each extracts its own small feature cache from the
unpacked archive (kept in the shared cache, so a rerun only reads it) and checks that SelMix ends above the
logit-adjusted head on its own test metric. The archives are unpacked once into $SELMIX_CACHE_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selmix_dist.experiments.data import Subset
from selmix_dist.experiments.runner import run_experiment
from selmix_dist.experiments.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("SELMIX_DATA_DIR", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("SELMIX_CACHE_DIR", REPO / ".cache"))


def reduced_run(experiment: str, archive: str, overrides: list[str], subset: Subset, out: Path) -> dict:
    if not (DATA_DIR / archive).is_file():
        pytest.skip(f"archive {DATA_DIR / archive} not found (set SELMIX_DATA_DIR)")
    spec = load_spec(REPO / "configs" / "experiments" / experiment, overrides)
    return run_experiment(spec, out=out, cache=CACHE, data_dir=DATA_DIR, seeds=[0], rho_us=[10.0],
                          methods=["la", "selmix_min_recall"], subset=subset, log=lambda _line: None)


@pytest.mark.slow
def test_reduced_cifar10_selmix_raises_min_recall(tmp_path):
    """300 train / 100 test images per class at the experiment's 128 px, ρ_l = ρ_u = 10, one seed, the
    experiment's learning rates with 500 steps: SelMix for min recall ends above the LA head's test min recall."""
    result = reduced_run("cifar10_lt.yaml", "cifar10-jpeg.tar.gz",
                         ["split.n1=100", "split.m1=150", "split.rho_l=10", "split.n_val=50",
                          "trainer.run.steps=500", "methods.fixmatch_la.steps=500"],
                         Subset(train=300, test=100), tmp_path / "out")
    test = {r["method"]: r["test"] for r in result["records"]}
    assert test["selmix_min_recall"]["min_recall"] > test["la"]["min_recall"]
    assert "SelMix: min recall" in (tmp_path / "out" / "tables.md").read_text()


@pytest.mark.slow
def test_reduced_tiny_imagenet_selmix_raises_min_recall(tmp_path):
    """The first 20 classes (sorted wnids), 100 train / 50 test images each at 64 px, ρ_l = ρ_u = 10, one seed,
    500 steps: SelMix for min recall ends above the LA head's test min recall."""
    result = reduced_run("tiny_imagenet_lt.yaml", "tiny-imagenet-200.tar.gz",
                         ["features.image_size=64", "split.n1=50", "split.m1=30", "split.rho_l=10",
                          "split.n_val=20", "trainer.run.steps=500", "methods.fixmatch_la.steps=500"],
                         Subset(train=100, test=50, classes=20), tmp_path / "out")
    assert len(result["class_names"]) == 20
    test = {r["method"]: r["test"] for r in result["records"]}
    assert test["selmix_min_recall"]["min_recall"] > test["la"]["min_recall"]
