"""Config: every key documented, YAML + overrides applied and typed, unknown keys rejected helpfully."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from selmix_dist.config import Config, all_keys, describe, load_config


def test_every_key_is_documented():
    keys = all_keys()
    expected = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                for f in dataclasses.fields(s.default_factory())}
    assert set(keys) == expected
    undocumented = [k for k, text in keys.items() if len(text.strip()) < 10]
    assert undocumented == []
    text = describe()
    assert all(k in text for k in keys)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 123\n  seed: 4\nobjective:\n  name: h_mean\nselmix:\n  temperature: 0.5\n")
    cfg = load_config(path, ["run.seed=7", "selmix.include_bias=true", "objective.params.omega=20"])
    assert (cfg.run.steps, cfg.run.seed, cfg.objective.name) == (123, 7, "h_mean")
    assert cfg.selmix.temperature == 0.5 and cfg.selmix.include_bias is True
    assert cfg.objective.params == {"h_mean": {"omega": 20}} and cfg.objective.active() == {"omega": 20}


@pytest.mark.parametrize("override, fragment", [
    ("run.stpes=5", "did you mean 'run.steps'"),
    ("selmx.temperature=1", "did you mean 'selmix'"),
    ("optim.lr=fast", "expects a number"),
    ("run.steps=1.5", "expects an integer"),
    ("selmix.setting=weakly", "must be one of"),
    ("selmix.temperature=0", r"must lie in \(0, ∞\)"),
    ("objective.name=min_recal", "did you mean 'min_recall'"),
    ("run.steps", "not of the form"),
])
def test_bad_overrides_are_named(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_config(None, [override])


def test_unknown_yaml_key_names_file_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*optim\.learning_rate"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_launcher_cli_help_and_errors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    launcher = Path(__file__).resolve().parents[2] / "launch" / "train.py"
    help_out = subprocess.run([sys.executable, str(launcher), "--help-config"], capture_output=True, text=True)
    assert help_out.returncode == 0 and all(k in help_out.stdout for k in all_keys())
    bad = subprocess.run([sys.executable, str(launcher), f"run.dir={tmp_path}", "optim.lr=0.1", "run.stepz=3"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "did you mean 'run.steps'" in bad.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a rejected config
    missing = subprocess.run([sys.executable, str(launcher), f"run.dir={tmp_path}",
                              f"data.features={tmp_path / 'nope'}"], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_every_shipped_experiment_config_loads():
    from pathlib import Path

    from selmix_dist.core import OBJECTIVES, build_objective

    configs = Path(__file__).resolve().parents[2] / "configs"
    # trainer configs only: accelerate configs and experiment files (tests/experiments) have other schemas
    paths = sorted(p for p in configs.rglob("*.yaml") if not {"accelerate", "experiments"} & set(p.parts))
    names = {load_config(p).objective.name for p in paths if p.parent.name == "cifar10_lt"}
    assert names == {"mean_recall", "min_recall", "h_mean", "g_mean", "mean_recall_min_coverage",
                     "h_mean_min_coverage"}  # at least one config per objective of the CIFAR-10-LT table
    for path in paths:
        cfg = load_config(path)
        assert cfg.objective.name in OBJECTIVES
        build_objective(cfg.objective.name, 10, **cfg.objective.active())  # parameters are valid for it


@pytest.mark.parametrize("override, key", [
    ("log.log_every=0", "log.log_every"), ("log.image_every=0", "log.image_every"),
    ("run.checkpoint_every=-1", "run.checkpoint_every"), ("run.test_every=-5", "run.test_every"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("run.keep_checkpoints=0", "run.keep_checkpoints"),
    ("selmix.pseudo_threshold=1.5", "selmix.pseudo_threshold"), ("optim.momentum=1.5", "optim.momentum"),
    ("selmix.target_support=0", "selmix.target_support"), ("data.head_fraction=1", "data.head_fraction"),
    ("optim.lr=nan", "optim.lr"), ("selmix.temperature_rule=hot", "selmix.temperature_rule"),
])
def test_every_range_is_checked_at_load(override, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, key", [
    (["selmix.setting=supervised", "model.init_head=fixmatch_la"], "model.init_head=fixmatch_la"),
    (["data.unlabeled_split="], "data.unlabeled_split"),
    (["run.steps=10", "optim.warmup_steps=20"], "optim.warmup_steps"),
    (["run.dir= "], "run.dir"),
    (["selmix.coverage_floor=true", "objective.name=h_mean"], "selmix.coverage_floor"),
])
def test_cross_key_rules_fail_before_any_work(overrides, key):
    with pytest.raises(ValueError, match=f"config key '{key}"):
        load_config(None, overrides)


def test_relative_temperature_alias_maps_onto_the_rule():
    assert load_config(None, ["selmix.relative_temperature=true"]).selmix.temperature_rule == "relative"
    assert load_config(None, ["selmix.relative_temperature=false"]).selmix.temperature_rule == "absolute"


def test_switching_objective_on_the_command_line_needs_no_clearing(tmp_path):
    from selmix_dist.core import build_objective

    configs = Path(__file__).resolve().parents[2] / "configs" / "cifar10_lt"
    base = load_config(configs / "min_recall.yaml")
    assert base.objective.active() == {"beta": 0.0, "omega": 50.0}
    cfg = load_config(configs / "min_recall.yaml", ["objective.name=h_mean"])
    assert cfg.objective.active() == {}
    build_objective("h_mean", 10, **cfg.objective.active())  # the min-recall ω does not leak into H-mean
    grouped = tmp_path / "g.yaml"
    grouped.write_text("objective:\n  name: min_recall\n  params:\n    min_recall: {omega: 7}\n"
                       "    mean_recall_min_coverage: {alpha: 0.9}\n")
    assert load_config(grouped).objective.active() == {"omega": 7}
    cfg = load_config(grouped, ["objective.name=mean_recall_min_coverage", "objective.params.tau=0.5"])
    assert cfg.objective.active() == {"alpha": 0.9, "tau": 0.5}


def test_the_schedule_sums_its_learning_rates_as_the_cosine_formula_does():
    import math

    import torch

    from selmix_dist.config import OptimConfig
    from selmix_dist.train.build import RunSchedule

    head = torch.nn.Linear(3, 2)
    schedule = RunSchedule(torch.optim.SGD(head.parameters(), lr=0.1), OptimConfig(lr=0.1), total_steps=40)
    by_hand = sum(0.1 * 0.5 * (1 + math.cos(math.pi * t / 40)) for t in range(10, 20))
    assert schedule.lr_sum(10, 20) == pytest.approx(by_hand, rel=1e-12)
    assert schedule.lr_sum(5, 5) == 0.0
