"""tools/study_defaults.py: variants are the base SelMix entry with the rule, its value and lr; P's support at
the last refresh is exp(entropy) of the snapshot; on the toy experiment rule 'support' ends with target·K pairs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from selmix_dist.experiments.methods import trainer_config
from selmix_dist.experiments.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("tools_study_defaults", REPO / "tools" / "study_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_rule(study):
    assert study.parse_rule("support:0.25") == ("support", 0.25)
    assert study.parse_rule("absolute:1e-1") == ("absolute", 0.1)
    for bad in ("support", "warm:1", "relative:0", "relative:-1"):
        with pytest.raises(ValueError, match="rule"):
            study.parse_rule(bad)


def test_variant_keeps_the_base_entry_and_sets_rule_value_and_lr(study):
    path = REPO / "configs" / "experiments" / "cifar10_lt.yaml"
    spec = load_spec(path)
    name = study.variant_name("selmix_min_recall", "support", 0.25, 1e-2)
    assert name == "selmix_min_recall__support_0p25__lr_0p01"
    entry = study.variant_entry(spec, "selmix_min_recall", "support", 0.25, 1e-2)
    with_variant = load_spec(path, [f"methods.{name}={json.dumps(entry)}"])
    s = with_variant.methods[name].settings
    base = spec.methods["selmix_min_recall"].settings
    assert (s.start, s.objective, s.params) == (base.start, base.objective, base.params)
    cfg = trainer_config(s, with_variant.trainer)
    assert (cfg.selmix.temperature_rule, cfg.selmix.target_support, cfg.optim.lr) == ("support", 0.25, 1e-2)
    assert cfg.run.steps == yaml.safe_load(path.read_text())["trainer"]["run.steps"]
    relative = study.variant_entry(spec, "selmix_h_mean", "relative", 0.3, 3e-3)["trainer"]
    assert relative["selmix.temperature"] == 0.3 and "selmix.target_support" not in relative
    with pytest.raises(ValueError, match="not a method of kind 'trainer'"):
        study.variant_entry(spec, "la", "support", 1.0, 3e-3)


def test_last_refresh_and_mean_squared_norm_by_hand(study, tmp_path):
    P = torch.zeros(3, 3)
    P[0, 1] = P[1, 2] = 0.25
    P[2, 0] = 0.5                       # H = 2·(¼ log 4) + ½ log 2 = 1.5 log 2
    G = torch.tensor([[0.0, -3.0, 1.0], [2.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    torch.save({"step": 150, "P": P, "G": G}, tmp_path / "distribution_last.pt")
    got = study.last_refresh(tmp_path)
    assert got["step"] == 150 and got["max_abs_gain"] == 3.0
    assert got["pairs"] == pytest.approx(2 ** 1.5)
    with pytest.raises(FileNotFoundError, match="distribution_last.pt"):
        study.last_refresh(tmp_path / "missing")
    assert study.mean_squared_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])) == pytest.approx(26 / 3)


def test_toy_study_support_rule_ends_on_its_target(study, toy_raw, toy_data_dir, tmp_path):
    toy_raw["methods"]["sm"] = {"kind": "trainer", "start": "erm", "objective": "mean_recall"}
    toy_raw["trainer"] = {"run.steps": 20, "run.refresh_every": 10, "optim.batch_size": 8}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_raw))
    with pytest.raises(ValueError, match="not complete"):
        study.require_complete_cache(load_spec(path), tmp_path / "cache")
    # fill the cache the way reproduce.py does, then the study (which never extracts) may run
    from selmix_dist.experiments.data import load_experiment_features

    load_experiment_features(load_spec(path), tmp_path / "cache", toy_data_dir, log=lambda _line: None)
    s = study.study(str(path), [], ["sm"], [("support", 0.75), ("absolute", 0.1)], [1e-3], seed=0, rho_u=4.0,
                    out=tmp_path / "out", cache=tmp_path / "cache", data_dir=toy_data_dir)
    assert [(r["rule"], r["value"]) for r in s["rows"]] == [("support", 0.75), ("absolute", 0.1)]
    k = s["num_classes"]
    support = s["rows"][0]
    assert k == 4 and support["step"] in (10, 20) and support["pairs"] == pytest.approx(0.75 * k, rel=1e-3)
    # every refresh (steps 0, 10[, 20]) solved T for the same target
    assert support["refreshes"] == support["step"] // 10 + 1 and support["refreshes_below_2"] == 0
    assert support["pairs_min"] == pytest.approx(0.75 * k, rel=1e-3)
    assert support["pairs_median"] == pytest.approx(0.75 * k, rel=1e-3)
    assert all(1.0 <= r["pairs"] <= k * k and 0.0 <= r["min_recall"] <= 1.0 for r in s["rows"])
    assert s["mean_sq_norm"] > 0 and math.isfinite(s["mean_sq_norm"])
    assert "| sm | support | 0.75 |" in study.table(s)
