"""A tiny real SelMix run shared by the tests in this folder: CIFAR-10 JPEGs (the `small_image_folder`
fixture), ImageNet EfficientNet-Lite0 features at 64 px cached in float32, 50 supervised SelMix steps; and
the command-line tools as importable modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from selmix_dist.config import load_config
from selmix_dist.data.sources import ImageFolderSource
from selmix_dist.data.splits import load_split, make_lt_split
from selmix_dist.features.backbones import build_backbone
from selmix_dist.features.cache import extract_features
from selmix_dist.train.entry import train

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64
SPLITS = ("labeled", "val", "test")
RUN_OVERRIDES = ["model.mode=features", "selmix.setting=supervised", "objective.name=min_recall",
                 "model.init_head=la", "model.init_head_steps=50", "run.steps=50", "run.refresh_every=10",
                 "run.test_every=25", "run.checkpoint_every=25", "optim.batch_size=32", "optim.lr=0.05",
                 "data.eval_batch_size=256", "log.progress=false", "log.tensorboard=false"]


def extract_split_features(folder: Path, split_dir: Path, cache: Path, splits=SPLITS) -> None:
    """The Lite0 float32 features of `splits` of `split_dir` into `cache` (the features mode's input)."""
    source = ImageFolderSource(folder)
    backbone = build_backbone("tf_efficientnet_lite0", "lite", image_size=IMAGE_SIZE)
    for name in splits:
        split = load_split(split_dir, name, source=source)
        extract_features(source, split.items, split.labels, backbone, cache, name, batch_size=64, dtype="float32",
                         num_workers=0, split_sha256=split.sha256, progress=False)


@pytest.fixture(scope="session")
def extract_lite() -> Callable[..., None]:
    """`extract_lite(folder, split_dir, cache, splits)`: the run's feature extraction, for more caches."""
    return extract_split_features


@pytest.fixture(scope="session")
def tool() -> Callable[[str], ModuleType]:
    """`tool("export")`: tools/export.py imported as a module (its `main(argv) -> exit code`)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def lite_run(tmp_path_factory, small_image_folder) -> dict[str, Path]:
    """{"run": run dir, "cache": feature cache, "split": split dir, "images": image folder, "image_size"}."""
    root = tmp_path_factory.mktemp("lite_run")
    split_dir, cache, run_dir = root / "split", root / "features", root / "run"
    make_lt_split(ImageFolderSource(small_image_folder), split_dir, n1=10, rho_l=2, m1=5, rho_u=1, n_val=5,
                  n_test=5, seed=0)
    extract_split_features(small_image_folder, split_dir, cache)
    train(load_config(None, [*RUN_OVERRIDES, f"run.dir={run_dir}", f"data.features={cache}",
                             f"data.split_dir={split_dir}"]))
    return {"run": run_dir, "cache": cache, "split": split_dir, "images": small_image_folder,
            "image_size": IMAGE_SIZE}


@pytest.fixture(scope="session")
def lite_export(lite_run, tool, tmp_path_factory) -> Path:
    """The best head of `lite_run` exported by tools/export.py (CLI entry point, in process)."""
    out = tmp_path_factory.mktemp("export") / "classifier"
    assert tool("export").main([str(lite_run["run"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def run_overrides() -> list[str]:
    """The config overrides of `lite_run` (without its run.dir, data.features and data.split_dir)."""
    return list(RUN_OVERRIDES)
