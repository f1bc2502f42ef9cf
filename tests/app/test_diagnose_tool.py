"""tools/diagnose_selmix.py finds the start head that labels the partners: the experiment's SelMix start, in the
configuration that --out's results.json reports (the store keeps every configuration it ever ran)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selmix_dist.experiments.spec import load_spec
from selmix_dist.experiments.store import ResultStore

REPO = Path(__file__).resolve().parents[2]


def _head(value: float) -> torch.nn.Linear:
    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.fill_(value)
        head.bias.fill_(value)
    return head


def test_the_default_start_is_the_selmix_methods_start(tool):
    diagnose = tool("diagnose_selmix")
    assert diagnose.selmix_start(load_spec(REPO / "configs/experiments/tiny_imagenet_lt.yaml")) == "tau_norm"
    assert diagnose.selmix_start(load_spec(REPO / "configs/experiments/cifar10_lt.yaml")) == "fixmatch_la"


def test_the_start_head_is_the_configuration_results_json_names(tool, tmp_path):
    diagnose = tool("diagnose_selmix")
    spec = load_spec(REPO / "configs/experiments/tiny_imagenet_lt.yaml")
    store = ResultStore(tmp_path / "store")
    # tau_norm sees labeled data only: one file per seed, no ρ_u folder. An older configuration lies beside it.
    store.put("tau_norm", 0, None, "0000old", {"method": "tau_norm"}, _head(1.0))
    store.put("tau_norm", 0, None, "1111cur", {"method": "tau_norm"}, _head(2.0))
    records = [{"method": "tau_norm", "seed": 0, "rho_u": 100.0, "digest": "1111cur"},
               {"method": "tau_norm", "seed": 1, "rho_u": 100.0, "digest": "2222other"}]
    (tmp_path / "results.json").write_text(json.dumps({"records": records}))

    head = diagnose.start_head(spec, tmp_path, "tau_norm", 0, 100.0)
    assert torch.equal(head.weight, torch.full((2, 3), 2.0))

    with pytest.raises(ValueError, match=r"results.json: no result of tau_norm for seed 0, ρ_u 1 \(0 found\)"):
        diagnose.start_head(spec, tmp_path, "tau_norm", 0, 1.0)
    with pytest.raises(ValueError, match="--start 'tau_nrom': not a method"):
        diagnose.start_head(spec, tmp_path, "tau_nrom", 0, 100.0)


def test_a_missing_result_is_one_error_line(tool, tmp_path, capsys):
    diagnose = tool("diagnose_selmix")
    code = diagnose.main(["--experiment", str(REPO / "configs/experiments/cifar10_lt.yaml"), "--out", str(tmp_path),
                          "--cache", str(tmp_path / "no-cache"), "--data-dir", str(tmp_path / "no-data")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: {tmp_path / 'results.json'}: no result of fixmatch_la for seed 0, ρ_u 100"), err
