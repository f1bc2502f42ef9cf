"""tools/gpu_check.py, the prepared GPU check, run end to end at its reduced CPU sizes (what CI can run), plus
its budget kill, its skips and its GEMM-floor formula against torch's own FLOP counter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402 - a tool script, importable from tools/

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def numbers(value):
    """Every float/int in a JSON value (bools excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = check("--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_step_runs_on_cpu_and_reports_finite_numbers(cpu_run):
    summary = json.loads((cpu_run / "summary.json").read_text())
    assert list(summary["steps"]) == list(gpu_check.STEPS)
    for name, entry in summary["steps"].items():
        record = json.loads((cpu_run / entry["file"]).read_text())
        assert record["status"] in ("ok", "skipped"), (name, record["reason"])
        assert record["reason"] and record["status"] == entry["status"], name
        assert all(math.isfinite(x) for x in numbers(record)), name
        assert "non_finite" not in record, name
    assert summary["seconds"] > 0


@pytest.mark.slow
def test_cpu_run_contents(cpu_run):
    steps = {name: json.loads((cpu_run / f"{name}.json").read_text()) for name in gpu_check.STEPS}
    cuda, subset = steps["tests"]["results"]
    assert (cuda["tests"], cuda["skipped"]) == (2, 2) and cuda["skip_reasons"] == ["needs a CUDA device"]
    assert subset["passed"] + subset["failed"] + subset["skipped"] == subset["tests"] > 2
    for row in steps["bench_gain"]["results"]:
        # the floor by hand: K = 50, 80 > d = 32, so 3 GEMMs + Z Wᵀ, Zᵀ D, Z (Zᵀ D) = 3 + 3·32/K
        assert row["gemm_units"] == pytest.approx(3 + 96 / row["K"])
        assert row["floor_ms"] == pytest.approx(row["gemm_units"] * row["gemm_ref_ms"])
    assert {(r["K"], r["objective"]) for r in steps["bench_gain"]["results"]} == {
        (k, o) for k in (50, 80) for o in ("min_recall", "mean_recall_min_coverage")}
    bench, probe = steps["bench_train"]["results"]
    assert (bench["tool"], bench["K"], bench["d"], bench["N_unl"]) == ("bench_train", 50, 32, 2000)
    assert bench["refresh_in_steps"] == pytest.approx(bench["refresh_s"] / (bench["step_ms"] / 1e3))
    assert set(bench["refresh_parts_s"]) >= {"eval_s", "gain_s"}
    assert probe["host_syncs_per_step"] is None and "CUDA only" in probe["host_syncs_reason"]
    assert probe["step_ms"] > 0 and probe["gpu_peak_mib"] is None
    (extract,) = steps["extract"]["results"]
    assert (extract["autocast"], extract["channels_last"], extract["device"]) == ("bf16", True, "cpu")
    assert extract["ratio"] == pytest.approx(extract["extract_images_per_s"] / extract["bare_images_per_s"])
    launch = {r["launcher"]: r for r in steps["launch"]["results"]}
    for kind in ("accelerate", "fork"):
        r = launch[kind]
        assert (r["status"], r["run_status"], r["world_size"], r["processes"], r["report_md"]) == (
            "ok", "complete", 1, 1, True), kind
        assert r["device"].startswith("cpu") and 0 <= r["val_first"] <= 1 and 0 <= r["val_last"] <= 1
    assert launch["deepspeed_zero2"]["status"] == "skipped" and "DeepSpeed" in launch["deepspeed_zero2"]["reason"]
    goals = [g["goal"] for s in steps.values() for g in s["goals"]]
    assert any("GEMM floor" in g for g in goals) and any("≥ 90 %" in g for g in goals)


def test_a_step_over_its_budget_is_killed_and_reported_timed_out(tmp_path):
    proc = check("--device", "cpu", "--out", str(tmp_path), "--only", "bench_gain", "--step-budget",
                 "bench_gain=0.5", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "bench_gain.json").read_text())
    assert record["status"] == "timed_out" and "budget" in record["reason"]
    assert record["runs"][0]["timed_out"] and record["results"] == []
    assert record["seconds"] < 30  # killed at 0.5 s, not left to finish (a bench_gain run takes several s)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == ["bench_gain"] and summary["steps"]["bench_gain"]["status"] == "timed_out"
    assert "timed_out" in proc.stdout


def test_the_kill_reaches_the_children_of_the_step(tmp_path):
    pid_file = tmp_path / "child"
    proc = gpu_check.run_proc(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 1.0, dict(os.environ))
    assert proc.timed_out and proc.rc is not None
    child = int(pid_file.read_text())
    time.sleep(0.2)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead and not yet reaped


def test_missing_packages_skip_with_what_is_missing(monkeypatch, tmp_path):
    real = gpu_check.importlib.util.find_spec
    absent = {"deepspeed", gpu_check.LITE0_PACKAGE}
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name in absent else real(name))
    ctx = gpu_check.Context("cuda", gpu_check.CUDA, dict(os.environ), tmp_path, reduced=False)
    reason = gpu_check.launch_run(ctx, "deepspeed_zero2")
    assert isinstance(reason, str) and "deepspeed" in reason and "--wheels" in reason
    lite = {"lite0": gpu_check.CUDA.extract["lite0_fp32"]}
    lite_only = gpu_check.Sizes(**{**gpu_check.CPU.__dict__, "extract": lite})
    step = gpu_check.Step("extract", 10.0)
    gpu_check.step_extract(step, gpu_check.Context("cpu", lite_only, dict(os.environ), tmp_path, reduced=True))
    record = step.to_json()
    assert record["status"] == "skipped" and gpu_check.LITE0_PACKAGE in record["reason"] and record["runs"] == []


@pytest.mark.parametrize(("k", "d"), [(12, 40), (40, 12)])
def test_gemm_units_count_the_gain_matrix_products(k, d):
    """gemm_units against torch's FLOP counter on gain_matrix itself (2·m·n·k per product, K×K×K = 2K³)."""
    from torch.utils.flop_counter import FlopCounterMode

    from selmix_dist.core.gain import gain_matrix

    g = torch.Generator().manual_seed(0)
    z, w = torch.rand(k, d, generator=g, dtype=torch.float64), 0.1 * torch.randn(k, d, generator=g)
    C = torch.full((k, k), 0.2 / (k * k), dtype=torch.float64) + torch.eye(k, dtype=torch.float64) * 0.8 / k
    psi = torch.randn(k, k, generator=g, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        gain_matrix(z, w, None, C, psi)
    assert counter.get_total_flops() / (2 * k**3) == pytest.approx(gpu_check.gemm_units(k, d))


def test_bad_arguments_are_one_error_line():
    proc = check("--device", "cpu", "--step-budget", "nosuch=3", timeout=60)
    assert proc.returncode == 2 and "error: --step-budget nosuch=3: unknown step 'nosuch'" in proc.stderr
    if not torch.cuda.is_available():
        proc = check("--device", "cuda", timeout=60)
        assert proc.returncode == 2 and "error: --device cuda, but torch sees no CUDA device" in proc.stderr
