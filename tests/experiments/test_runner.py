"""selmix_dist.experiments.runner on the toy experiment: every (seed, ρ_u, method) result, stored as it
completes and read back on a rerun; a changed setting recomputes that method and what starts from it; a
method kind is added by the decorator alone; stored metrics agree with sklearn on the stored heads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import recall_score

from selmix_dist.experiments.methods import KINDS, PosthocSettings, method_kind
from selmix_dist.experiments.runner import result_keys, run_experiment, select_methods, with_starts
from selmix_dist.experiments.spec import parse_spec
from selmix_dist.experiments.store import ResultStore
from selmix_dist.features.reader import load_features

REPO = Path(__file__).resolve().parents[2]
CALLS: list[tuple[int, int]] = []


@pytest.fixture
def counting_kind():
    """A kind registered the way every kind is (decorator), recording its calls: the start head, unchanged."""
    @method_kind("counting", PosthocSettings, uses_unlabeled=True)
    def counting(ctx, s):
        CALLS.append((ctx.seed, len(ctx.data.partners)))
        return ctx.start(s)

    CALLS.clear()
    yield "counting"
    del KINDS["counting"]


def run(spec, tmp_path, data_dir, **kw):
    return run_experiment(spec, out=tmp_path / "out", cache=tmp_path / "cache", data_dir=data_dir,
                          log=lambda _line: None, **kw)


def test_a_start_listing_several_methods_takes_the_best_on_validation(toy_raw, toy_data_dir, tmp_path,
                                                                     counting_kind):
    """start: [erm, st] — per (seed, ρ_u) the head with the higher validation mean recall (the metric of a
    method compared on none), read here from the candidates' own records; its name and scores go into info."""
    toy_raw["methods"]["pick"] = {"kind": counting_kind, "start": ["erm", "st"]}
    result = run(parse_spec(toy_raw, "toy.yaml"), tmp_path, toy_data_dir)
    by = {(r["method"], r["seed"], r["rho_u"]): r for r in result["records"]}
    picks = [r for r in result["records"] if r["method"] == "pick"]
    assert len(picks) == 4
    for r in picks:
        val = {n: by[(n, r["seed"], r["rho_u"])]["val"]["mean_recall"] for n in ("erm", "st")}
        assert r["info"]["start_val"] == pytest.approx(val)
        assert r["info"]["start"] == max(val, key=val.get)
        assert r["test"] == by[(r["info"]["start"], r["seed"], r["rho_u"])]["test"]   # the chosen head itself


def test_a_plugin_started_by_plugin_keeps_the_candidate_whose_plugin_is_best(toy_raw, toy_data_dir, tmp_path):
    """start_by: plugin — the same result as the better of the two single-start plug-ins (by their validation
    metric, the first listed on a tie), which are computed separately here."""
    for name, start in (("p_erm", "erm"), ("p_st", "st"), ("p_pick", ["erm", "st"])):
        toy_raw["methods"][name] = {"kind": "plugin", "start": start, "objective": "g_mean", "iterations": 5}
    toy_raw["methods"]["p_pick"]["start_by"] = "plugin"
    result = run(parse_spec(toy_raw, "toy.yaml"), tmp_path, toy_data_dir, methods=["p_*"])
    by = {(r["method"], r["seed"], r["rho_u"]): r for r in result["records"]}
    picks = [r for r in result["records"] if r["method"] == "p_pick"]
    assert len(picks) == 4
    for r in picks:
        single = {n: by[(f"p_{n}", r["seed"], r["rho_u"])] for n in ("erm", "st")}
        best = max(("erm", "st"), key=lambda n: single[n]["val"]["g_mean"])
        assert r["info"]["start"] == best
        assert r["info"]["start_plugin_val"][best][1] == pytest.approx(single[best]["val"]["g_mean"])
        assert r["val"] == single[best]["val"] and r["test"] == single[best]["test"]
    toy_raw["methods"]["p_pick"]["start_by"] = "after"
    with pytest.raises(ValueError, match="p_pick.*start_by must be 'head' or 'plugin'"):
        parse_spec(toy_raw, "toy.yaml")


def test_results_are_stored_as_they_complete_and_reused(toy_raw, toy_data_dir, tmp_path, counting_kind):
    toy_raw["methods"]["count"] = {"kind": counting_kind, "start": "st"}
    spec = parse_spec(toy_raw, "toy.yaml")
    first = run(spec, tmp_path, toy_data_dir)
    # labeled-only methods once per seed (2 + 2), the others per (seed, ρ_u) (4 + 4); unlabeled sets of
    # 8 + 5 + 3 + 2 (M1 = 8, ρ_u = 4) and 4 × 8 (ρ_u = 1) images
    assert first["timings"]["computed"] == 12 and first["timings"]["stored"] == 4
    assert len(first["records"]) == 16 and sorted(CALLS) == [(0, 18), (0, 32), (1, 18), (1, 32)]
    store = tmp_path / "out" / "store"
    assert len(list((store / "seed0").glob("erm-*.json"))) == 1                  # not per ρ_u
    assert len(list((store / "seed0" / "rho_u4").glob("st-*.json"))) == 1
    erm = [r for r in first["records"] if r["method"] == "erm" and r["seed"] == 0]
    assert [r["rho_u"] for r in erm] == [4.0, 1.0] and erm[0]["test"] == erm[1]["test"]
    tau = [r for r in first["records"] if r["method"] == "tau_norm"][0]
    assert tau["info"]["tau"] in (0.0, 0.5, 1.0)

    CALLS.clear()
    again = run(spec, tmp_path, toy_data_dir)
    assert again["timings"]["computed"] == 0 and CALLS == []
    assert again["records"] == first["records"]

    # a new setting of 'st' recomputes 'st' and 'count' (which starts from it), nothing else
    toy_raw["methods"]["st"]["steps"] = 6
    changed = run(parse_spec(toy_raw, "toy.yaml"), tmp_path, toy_data_dir)
    assert changed["timings"]["computed"] == 8 and len(CALLS) == 4
    assert len(list((store / "seed0" / "rho_u4").glob("st-*.json"))) == 2      # the old result is kept

    # reporting one method still reads its starts; --recompute replaces only what it names
    CALLS.clear()
    only = run(parse_spec(toy_raw, "toy.yaml"), tmp_path, toy_data_dir, methods=["cou*"], seeds=[1],
               recompute=["erm"])
    assert {r["method"] for r in only["records"]} == {"count"} and only["timings"]["computed"] == 1
    assert CALLS == []


def test_stored_metrics_match_sklearn_on_the_stored_heads(toy_raw, toy_data_dir, tmp_path):
    spec = parse_spec(toy_raw, "toy.yaml")
    result = run(spec, tmp_path, toy_data_dir, seeds=[0], rho_us=[4.0], methods=["tau_norm"])
    (rec,) = result["records"]
    test = load_features(result["feature_cache"], "test")
    head = ResultStore(tmp_path / "out" / "store").head("tau_norm", 0, None, rec["digest"])
    with torch.no_grad():
        preds = head(test.features).argmax(dim=1).numpy()
    recalls = recall_score(test.labels.numpy(), preds, average=None, labels=range(4))
    assert rec["test"]["mean_recall"] == pytest.approx(float(np.mean(recalls)))
    assert rec["test"]["min_recall"] == pytest.approx(float(np.min(recalls)))
    assert rec["test"]["per_class_recall"] == pytest.approx(recalls.tolist())
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["records"][0]["test"] == rec["test"]
    lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert lines[0].startswith("rho_u,seed,method,split,mean_recall") and len(lines) == 3   # val + test
    assert "| tau_norm |" in (tmp_path / "out" / "tables.md").read_text()


def test_keys_depend_on_what_a_result_depends_on(toy_raw):
    spec = parse_spec(toy_raw, "toy.yaml")
    from selmix_dist.experiments.data import Subset

    plan = with_starts(spec, ["tau_norm", "st"])
    assert plan == ["erm", "tau_norm", "st"]
    a = result_keys(spec, Subset(), 0, 4.0, plan)
    b = result_keys(spec, Subset(), 0, 1.0, plan)
    assert a["erm"] == b["erm"] and a["tau_norm"] == b["tau_norm"]   # labeled data only: one result per seed
    assert a["st"] != b["st"]                                        # sees the unlabeled set
    assert result_keys(spec, Subset(), 1, 4.0, plan)["erm"] != a["erm"]
    toy_raw["methods"]["erm"]["max_iter"] = 21
    c = result_keys(parse_spec(toy_raw, "toy.yaml"), Subset(), 0, 4.0, plan)
    assert all(c[n] != a[n] for n in plan)                           # a start's change reaches its dependents
    toy_raw["methods"]["erm"]["label"] = "renamed"
    toy_raw["methods"]["erm"]["max_iter"] = 20
    assert result_keys(parse_spec(toy_raw, "toy.yaml"), Subset(), 0, 4.0, plan) == a   # labels do not count
    with pytest.raises(ValueError, match="no method matches 'tau' \\(did you mean 'tau_norm'\\?\\)"):
        select_methods(spec, ["tau"])


def test_a_kind_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="registered twice"):
        method_kind("crt", PosthocSettings, uses_unlabeled=False)(lambda ctx, s: None)


def test_tool_runs_an_experiment_file_and_prints_its_tables(toy_raw, toy_data_dir, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_raw, allow_unicode=True))
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--experiment", str(path), "--seeds", "1",
           "--rho-u", "2", "--methods", "erm", "st", "--set", "methods.st.steps=3", "--out", str(tmp_path / "out"),
           "--cache", str(tmp_path / "cache"), "--data-dir", str(toy_data_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[2/2] seed=1 ρ_u=2 st" in proc.stdout and "| self-training |" in proc.stdout
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["experiment"]["methods"]["st"]["steps"] == 3 and len(result["records"]) == 2
    bad = subprocess.run([*cmd[:4], "--set", "split.n2=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: " in bad.stderr
    assert "unknown key 'split.n2' (did you mean 'split.n1'?)" in bad.stderr


def test_a_trainer_method_stopped_by_a_signal_stores_nothing(toy_raw, toy_data_dir, tmp_path, monkeypatch):
    """A SIGTERM during a SelMix method makes the trainer checkpoint and return early: that head is no result."""
    from selmix_dist.train.trainer import Trainer

    def stopped(self):
        return {"step": 3, "stopped_by": "signal", "best": {}}

    monkeypatch.setattr(Trainer, "run", stopped)
    toy_raw["methods"] = {"erm": toy_raw["methods"]["erm"],
                          "sm": {"kind": "trainer", "start": "erm", "objective": "min_recall"}}
    toy_raw["trainer"] = {**toy_raw.get("trainer", {}), "optim.batch_size": 8}
    with pytest.raises(KeyboardInterrupt, match="signal received"):
        run(parse_spec(toy_raw, "toy.yaml"), tmp_path, toy_data_dir, seeds=[1], rho_us=[2.0])
    stored = [p.name for p in (tmp_path / "out" / "store").rglob("*.json")]
    assert stored and not any(name.startswith("sm-") for name in stored)


def test_results_fitted_with_other_thread_counts_are_recorded_and_warned_about(toy_raw, toy_data_dir, tmp_path):
    spec = parse_spec(toy_raw, "toy.yaml")
    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        torch.set_num_threads(1)
        one = run_experiment(spec, out=tmp_path / "out", cache=tmp_path / "cache", data_dir=toy_data_dir,
                             log=lines.append, seeds=[0], rho_us=[4.0])
        assert {r["torch_threads"] for r in one["records"]} == {1}
        assert not [line for line in lines if line.startswith("warning")]
        torch.set_num_threads(2)
        lines.clear()
        mixed = run_experiment(spec, out=tmp_path / "out", cache=tmp_path / "cache", data_dir=toy_data_dir,
                               log=lines.append, seeds=[0], rho_us=[4.0], recompute=["tau_norm"])
    finally:
        torch.set_num_threads(before)
    assert {r["method"]: r["torch_threads"] for r in mixed["records"]}["tau_norm"] == 2
    assert {r["torch_threads"] for r in mixed["records"]} == {1, 2}
    (warning,) = [line for line in lines if line.startswith("warning")]
    assert "[1, 2] torch threads" in warning and "--recompute" in warning
