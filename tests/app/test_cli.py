"""Errors a person can act on: the real command lines, run as a user runs them (subprocess), print one line
`error: ...` naming what to change, exit 2, and no traceback unless --debug is given."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
from PIL import Image

from selmix_dist.cli import run_cli
from selmix_dist.config import Config, all_keys, load_config
from selmix_dist.core import OBJECTIVES
from selmix_dist.train.lock import RunLockedError

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = "test_efficientnet"  # timm's smallest EfficientNet: a random-weights backbone costs milliseconds


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The one-line error rule; returns the error line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """2 classes × 2 random 32×32 PNGs."""
    root = tmp_path_factory.mktemp("tiny_folder")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def extract(folder: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run("tools/extract_features.py", "--source-kind", "imagefolder", "--source", folder, "--model", TINY_MODEL,
               "--weights", "none", "--image-size", "32", "--num-workers", "0", "--out", out, *args)


@pytest.fixture(scope="module")
def random_cache(tiny_folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A float16 feature cache of `tiny_folder` from a random-weights backbone, and the run that wrote it."""
    out = tmp_path_factory.mktemp("random_cache") / "features"
    proc = extract(tiny_folder, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# ----------------------------------------------------------------------------------------- the rule itself


def test_run_cli_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
    def failing(error):
        def main(argv):
            assert "--debug" not in argv  # run_cli consumes the flag
            raise error
        return main

    for error in (ValueError("bad key 'x'"), FileNotFoundError("no file y"), FileExistsError("z exists"),
                  RunLockedError("held by PID 1"), FloatingPointError("loss became non-finite")):
        assert run_cli(failing(error), ["a"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == f"error: {error}" and "--debug" in err
        with pytest.raises(type(error)):
            run_cli(failing(error), ["a", "--debug"])
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(failing(KeyError("bug")), [])
    assert run_cli(lambda argv: 0, ["--", "--debug"]) == 0  # after "--" it is an argument, not the flag


# ------------------------------------------------------------------------------------------------ backbones


def test_offline_timm_weights_say_what_to_pass_instead(tiny_folder, tmp_path):
    # HF_HUB_OFFLINE makes the hub fail at once; without a network it fails the same way (LocalEntryNotFoundError,
    # an OSError) after its retries, about a minute here.
    proc = run("tools/extract_features.py", "--source-kind", "imagefolder", "--source", tiny_folder, "--model",
               "resnet18", "--weights", "timm", "--out", tmp_path / "out", env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(proc, "no network", "'lite'", "tf_efficientnet_lite0", "--weights", "local checkpoint")
    assert not (tmp_path / "out").exists()


def test_a_mistyped_model_name_suggests_close_timm_names(tiny_folder, tmp_path):
    proc = extract(tiny_folder, tmp_path / "out", "--model", "resnet5O")
    line = assert_user_error(proc, "unknown timm model 'resnet5O'", "did you mean")
    suggested = re.findall(r"'([^']+)'", line.split("did you mean", 1)[1])
    assert "resnet50" in suggested and all(timm.is_model(name) for name in suggested)
    assert suggested == difflib.get_close_matches("resnet5O", timm.list_models(), n=5, cutoff=0.6)


def test_weights_none_warns_that_the_backbone_is_random(random_cache):
    _, proc = random_cache
    (warning,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: --weights none")]
    assert "randomly initialised" in warning and TINY_MODEL in warning and "--weights lite" in warning


def test_feature_cache_key_mismatch_names_the_overwrite_flag(random_cache, tiny_folder):
    out, _ = random_cache
    line = assert_user_error(extract(tiny_folder, out, "--dtype", "float32"), str(out), "--overwrite",
                             "dtype: cache has 'float16', requested 'float32'")
    assert "overwrite=True" not in line
    assert json.loads((out / "manifest.json").read_text())["key"]["dtype"] == "float16"  # refused: untouched
    replaced = extract(tiny_folder, out, "--dtype", "float32", "--overwrite")  # the flag the message names works
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["key"]["dtype"] == "float32"


# --------------------------------------------------------------------------------------------------- sources


def test_hf_dataset_dict_without_a_split_names_the_option_flag(tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    train = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 5}, features=features)
    datasets.DatasetDict({"train": train, "test": train.select(range(2))}).save_to_disk(str(tmp_path / "hf"))
    split_args = ["--kind", "hf", "--source", tmp_path / "hf", "--n1", "2", "--rho-l", "1", "--m1", "1", "--rho-u",
                  "1", "--n-val", "1", "--n-test", "1", "--seed", "0", "--out", tmp_path / "split"]
    line = assert_user_error(run("tools/make_lt_split.py", *split_args), "--option split=", "['test', 'train']")
    assert str(tmp_path / "hf") in line and not (tmp_path / "split").exists()
    named = run("tools/make_lt_split.py", *split_args, "--option", "split=train")  # the flag the message names
    assert named.returncode == 0, named.stderr[-3000:]
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    assert manifest["sources"]["train"]["options"]["split"] == "train" and manifest["class_names"] == ["cat", "dog"]


# ---------------------------------------------------------------------------------------------- the launcher


ABSOLUTE_OR_PARENT = re.compile(r"\.\./|(?<![\w.~-])/(?:[\w.-]+/)*[\w.-]+")


def test_launcher_help_shows_defaults_every_objective_and_only_repository_paths():
    help_text, config_text = run("launch/train.py", "--help"), run("launch/train.py", "--help-config")
    assert help_text.returncode == 0 and config_text.returncode == 0
    defaults = Config().to_dict()
    for out in (help_text.stdout, config_text.stdout):
        for name, cls in OBJECTIVES.items():
            assert re.search(rf"^  {name} +\S", out, re.M), name
            for param, value in cls.defaults.items():
                assert f"{param}={value!r}" in out
        assert not ABSOLUTE_OR_PARENT.findall(out), ABSOLUTE_OR_PARENT.findall(out)
        assert str(REPO) not in out
    for key in ("run.dir", "run.steps", "optim.lr", "objective.name", "data.features"):  # the common keys, --help
        section, name = key.split(".")
        assert f"{key}={defaults[section][name]!r}" in help_text.stdout
    for key in all_keys():  # every key with its default, --help-config
        section, name = key.split(".")
        assert f"{key} = {defaults[section][name]!r}" in config_text.stdout
    listed = re.findall(r"^  (configs/\S+\.yaml)$", help_text.stdout, re.M)
    assert "configs/cifar10_lt/min_recall.yaml" in listed
    for config in listed:
        load_config(REPO / config)  # a training config, not an accelerate or experiment file


def test_launcher_reports_a_diverged_run_as_a_user_error(lite_run, tmp_path):
    args = [f"run.dir={tmp_path / 'run'}", f"data.features={lite_run['cache']}", f"data.split_dir={lite_run['split']}",
            "selmix.setting=supervised", "model.init_head_steps=20", "run.steps=20", "run.refresh_every=10",
            "optim.lr=1e30", "log.tensorboard=false", "log.progress=false"]
    assert_user_error(run("launch/train.py", *args), "non-finite", "optim.lr")
