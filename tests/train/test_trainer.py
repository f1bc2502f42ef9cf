"""The distributed trainer: crash/resume equality, signals, rank agreement, TensorBoard, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "synthetic_run.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
COMMON = ["run.steps=60", "run.refresh_every=10", "run.checkpoint_every=20", "run.test_every=30",
          "run.signal_poll_every=5", "objective.name=min_recall", "model.init_head=la",
          "model.init_head_steps=50", "optim.lr=0.05", "optim.batch_size=32", "data.eval_batch_size=64"]


def run_script(run_dir: Path, *args: str, procs: int = 1, accelerate_config: str | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT)]
    elif accelerate_config:
        # No ACCELERATE_USE_CPU here: it would silently replace DeepSpeed by plain MULTI_CPU.
        cmd = [str(ACCELERATE), "launch", "--config_file", accelerate_config, str(SCRIPT)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT)]
    return subprocess.run([*cmd, str(run_dir), *COMMON, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_head(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_head.pt", weights_only=False)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    ok(run_script(run_dir))
    return run_dir


def test_kill9_then_resume_is_bitwise_identical(reference_run, tmp_path):
    killed = run_script(tmp_path, "--kill-at", "37")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final_head.pt").exists()
    assert (tmp_path / "checkpoints" / "step_00000020.pt").exists()
    ok(run_script(tmp_path))
    ref, got = final_head(reference_run), final_head(tmp_path)
    assert torch.equal(ref["weight"], got["weight"]) and torch.equal(ref["bias"], got["bias"])
    # The resumed history has no duplicate or missing evaluation and matches the uninterrupted run.
    assert history(tmp_path) == history(reference_run)


def test_sigusr1_checkpoints_at_next_boundary_and_exits_zero(reference_run, tmp_path):
    proc = ok(run_script(tmp_path, "--signal-at", "23"))
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert steps[-1] == "step_00000025.pt"  # the next poll boundary after the signal
    assert torch.load(tmp_path / "final_head.pt", weights_only=False)["summary"]["stopped_by"] == "signal"
    assert not (tmp_path / "report.json").exists(), proc.stdout
    ok(run_script(tmp_path))
    assert torch.equal(final_head(reference_run)["weight"], final_head(tmp_path)["weight"])


def test_run_directory_and_tensorboard(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = json.loads((reference_run / "report.json").read_text())
    assert report  # the report module's content is tested in test_report.py
    acc = EventAccumulator(str(reference_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "val/min_recall", "test/min_recall", "selmix/max_gain",
                "selmix/entropy_P", "val/per_class_recall/class_000", "pseudo_labels/count/class_000",
                "multipliers/lambda/class_000"):
        assert tag in tags["scalars"], tag
    assert {"selmix/P", "selmix/G"} <= set(tags["images"])
    val_steps = [e.step for e in acc.Scalars("val/min_recall")]
    assert val_steps == [0, 10, 20, 30, 40, 50, 60]
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}  # cosine over 60 steps from 0.05
    assert sorted(lr) == list(range(9, 60, 10))
    for step, value in lr.items():
        assert value == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * step / 60)), rel=1e-6)
    # The history agrees with TensorBoard and the best checkpoint is chosen on validation only.
    val = [h for h in history(reference_run) if h["split"] == "val"]
    best = max(val, key=lambda h: h["metrics"]["min_recall"])
    assert torch.load(reference_run / "checkpoints" / "best.pt", weights_only=True)["step"] == best["step"]


def test_resumed_tensorboard_steps_continue(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_script(tmp_path, "--kill-at", "45").returncode == -signal.SIGKILL
    ok(run_script(tmp_path))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(9, 60, 10))


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("override, message", [
    ("objective.name=h_mean", "objective.name: 'min_recall' → 'h_mean'"),
    ("optim.lr=0.5", "optim.lr: 0.05 → 0.5"),
    ("selmix.temperature=3", "selmix.temperature: 0.1 → 3.0"),
    ("run.resume=never", "already holds checkpoints"),
])
def test_resume_mismatch_is_refused_and_nothing_is_overwritten(reference_run, override, message):
    before = _tree_digest(reference_run)
    proc = run_script(reference_run, override)
    assert proc.returncode != 0 and message in proc.stderr
    assert _tree_digest(reference_run) == before


def test_resume_with_other_number_of_classes_is_refused(reference_run):
    proc = run_script(reference_run, "--classes", "5")
    assert proc.returncode != 0 and "num_classes=6" in proc.stderr


def test_data_errors(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from synthetic_run import synthetic_data

    from selmix_dist.config import load_config
    from selmix_dist.features.sets import FeatureSet
    from selmix_dist.train.trainer import Trainer

    cfg = load_config(None, [f"run.dir={tmp_path}", "data.num_classes=7"])
    with pytest.raises(ValueError, match="data.num_classes=7 but the data has 6"):
        Trainer(cfg, synthetic_data())
    data = synthetic_data()
    keep = data.val.labels != 3
    data.val = FeatureSet(data.val.features[keep], data.val.labels[keep], "val")
    data.class_names = [f"c{i}" for i in range(6)]
    with pytest.raises(ValueError, match=r"split 'val' has no sample of class\(es\) \['c3'\]"):
        Trainer(load_config(None, [f"run.dir={tmp_path}"]), data)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("confusion", ["hard", "soft", "floor"])
def test_two_processes_agree_with_one_at_first_refresh(tmp_path, synthetic_cache, confusion):
    """One process in memory, two through the cache reader (each pseudo-labels its shard of the pool); the
    soft confusion (fixed-point sums) is the same C bit for bit, and so is the coverage floor's head."""
    one, two = tmp_path / "one", tmp_path / "two"
    soft = {"soft": ["selmix.confusion_temperature=1.0"], "hard": [],
            "floor": ["objective.name=mean_recall_min_coverage", "objective.params.alpha=1.0",
                      "selmix.coverage_floor=true"]}[confusion]
    ok(run_script(tmp_path / "r1", "--dump-refresh", str(one), *soft))
    ok(run_script(tmp_path / "r2", "--dump-refresh", str(two), "--cache", str(synthetic_cache), *soft, procs=2))
    a = torch.load(f"{one}.rank0", weights_only=True)
    b0, b1 = (torch.load(f"{two}.rank{r}", weights_only=True) for r in (0, 1))
    hard = a["counts"].double() / a["counts"].sum()
    assert torch.equal(a["joint"], hard) == (confusion != "soft")
    if confusion == "floor":   # α = 1: every class predicted for its share, 25 of the 150 validation rows (the
        assert a["counts"].sum(dim=0).tolist() == [25] * 6   # start head's columns are 27, 24, 25, 25, 25, 24)
    for b in (b0, b1):
        assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["joint"], b["joint"])
        assert torch.equal(a["partner_labels"], b["partner_labels"])
        # Feature sums are reduced in another order: equal up to float64 rounding.
        torch.testing.assert_close(a["prototypes"], b["prototypes"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a["P"], b["P"], rtol=1e-9, atol=1e-15)
    assert torch.equal(b0["P"], b1["P"]) and torch.equal(b0["partner_labels"], b1["partner_labels"])


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """The synthetic splits as a float32 feature cache in 64-row chunks (exact copies of the rows)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from synthetic_run import write_synthetic_cache

    cache = tmp_path_factory.mktemp("synthetic_cache")
    write_synthetic_cache(cache)
    return cache


def test_run_through_the_cache_reader_equals_in_memory_and_resumes_bitwise(reference_run, synthetic_cache,
                                                                         tmp_path):
    """The same rows through the trainer's cache reader: the same run, bit for bit, and kill -9 / resume too."""
    full, crash = tmp_path / "full", tmp_path / "crash"
    ok(run_script(full, "--cache", str(synthetic_cache)))
    assert torch.equal(final_head(full)["weight"], final_head(reference_run)["weight"])
    assert run_script(crash, "--kill-at", "37", "--cache", str(synthetic_cache)).returncode == -signal.SIGKILL
    ok(run_script(crash, "--cache", str(synthetic_cache)))
    assert torch.equal(final_head(crash)["weight"], final_head(reference_run)["weight"])
    assert torch.equal(final_head(crash)["bias"], final_head(reference_run)["bias"])


@pytest.mark.slow
def test_two_process_kill9_resume_matches_uninterrupted(tmp_path, synthetic_cache):
    """Two ranks: in memory, uninterrupted; through the cache reader (pool sharded for pseudo-labelling),
    killed and resumed: the same head."""
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    ok(run_script(ref, procs=2))
    assert run_script(crash, "--kill-at", "33", "--cache", str(synthetic_cache), procs=2).returncode != 0
    ok(run_script(crash, "--cache", str(synthetic_cache), procs=2))
    torch.testing.assert_close(final_head(crash)["weight"], final_head(ref)["weight"], rtol=0, atol=1e-6)
    # resuming on another number of ranks works too
    ok(run_script(crash, "run.steps=70", "run.extend_steps=true", procs=1))
    assert final_head(crash)["summary"]["step"] == 70


@pytest.mark.slow
def test_deepspeed_zero2_smoke_two_cpu_processes(tmp_path):
    proc = ok(run_script(tmp_path, "run.steps=20", procs=2, timeout=600,
                         accelerate_config=str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml")))
    head = final_head(tmp_path)
    assert (head["distributed_type"], head["world_size"]) == ("DEEPSPEED", 2)
    assert torch.isfinite(head["weight"]).all() and head["summary"]["step"] == 20, proc.stdout[-2000:]
    assert (tmp_path / "report.json").exists()


def test_early_stop_when_max_gain_is_stable(tmp_path):
    # window 2 with a huge tolerance: converged at the second refresh (step 10), identically on all ranks.
    ok(run_script(tmp_path, "run.early_stop=true", "run.early_stop_window=2", "run.early_stop_tol=100"))
    summary = final_head(tmp_path)["summary"]
    assert (summary["stopped_by"], summary["step"]) == ("early_stop", 10)
    assert max(h["step"] for h in history(tmp_path)) == 10 and (tmp_path / "report.json").exists()
    # with an impossible tolerance the same run goes the distance
    ok(run_script(tmp_path / "full", "run.early_stop=true", "run.early_stop_window=2", "run.early_stop_tol=0"))
    assert final_head(tmp_path / "full")["summary"]["step"] == 60


def test_pseudo_labelling_every_nth_refresh(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from synthetic_run import synthetic_data

    from selmix_dist.config import load_config
    from selmix_dist.train.trainer import Trainer

    labels_at = {}

    def record(trainer) -> None:  # the partner labels the latest refresh decided, by refresh step
        labels_at[trainer.refresher.step] = trainer.refresher.partner_labels

    cfg = load_config(None, [f"run.dir={tmp_path}", *COMMON, "selmix.pseudo_label_every=3", "log.progress=false"])
    trainer = Trainer(cfg, synthetic_data(), hooks=[record])
    trainer.run()
    record(trainer)
    trainer.close()
    assert sorted(labels_at) == [0, 10, 20, 30, 40, 50, 60]
    fresh = [s for s in sorted(labels_at) if not any(labels_at[s] is labels_at[t] for t in labels_at if t < s)]
    assert fresh == [0, 30, 60]  # refreshes 0, 3 and 6 pseudo-label; the others reuse those labels
    assert labels_at[10] is labels_at[0] and labels_at[50] is labels_at[30]
    assert labels_at[0].dtype == torch.int32


def test_fresh_start_with_overwrite_leaves_nothing_of_the_old_run(reference_run, tmp_path):
    import shutil

    run_dir = tmp_path / "reused"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "notes.txt").write_text("mine")
    ok(run_script(run_dir, "run.resume=never", "run.overwrite=true", "run.steps=20", "run.seed=5"))
    history_steps = [h["step"] for h in history(run_dir)]
    assert max(history_steps) == 20 and history_steps.count(0) == 2  # one val + one test record, not four
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*.pt")] == ["step_00000020.pt"]
    assert (run_dir / "notes.txt").read_text() == "mine"  # files that are not ours are left alone
    assert len(list((run_dir / "tb").iterdir())) == 1  # one fresh events file


def test_auto_resume_refuses_when_no_checkpoint_is_usable(reference_run, tmp_path):
    import shutil

    run_dir = tmp_path / "broken"
    shutil.copytree(reference_run, run_dir)
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"not a checkpoint")
    before = _tree_digest(run_dir)
    proc = run_script(run_dir)
    assert proc.returncode != 0 and "none is usable" in proc.stderr
    assert _tree_digest(run_dir) == before


@pytest.mark.slow
def test_start_head_is_one_head_under_both_launchers_and_any_thread_count(tmp_path):
    """The self-trained start head (float32 SGD: thread-count sensitive) is fitted with a fixed thread count."""
    base = [str(SCRIPT), *COMMON, "run.steps=0", "model.init_head=fixmatch_la", "model.init_head_steps=40"]
    heads = []
    for name, threads, launcher in (("py1", "1", []), ("py2", "2", []),
                                    ("acc", "1", [str(ACCELERATE), "launch", "--cpu", "--num_processes", "1",
                                                  "--mixed_precision", "no", "--dynamo_backend", "no"])):
        run_dir = tmp_path / name
        cmd = [*launcher, *base] if launcher else [sys.executable, *base]
        cmd.insert(len(launcher) + (0 if launcher else 1) + 1, str(run_dir))
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        heads.append(torch.load(run_dir / "init_head.pt", weights_only=True))
    for other in heads[1:]:
        assert torch.equal(heads[0]["weight"], other["weight"]) and torch.equal(heads[0]["bias"], other["bias"])


def test_auto_start_head_is_fixmatch_la_in_semi_and_la_in_supervised(tmp_path):
    """model.init_head=auto (the default): the FixMatch-LA head in 'semi', the LA head in 'supervised',
    each equal to the head fitted directly with the same settings."""
    sys.path.insert(0, str(SCRIPT.parent))
    from synthetic_run import synthetic_data

    from selmix_dist.config import load_config
    from selmix_dist.heads.start import fit_start_head
    from selmix_dist.train.trainer import Trainer

    data = synthetic_data()
    x, y = data.labeled.features, data.labeled.labels
    fit = {"weight_decay": 5e-4, "steps": 40, "seed": 3}
    expected = {"semi": fit_start_head("fixmatch_la", x, y, 6, unlabeled=data.partners.features, **fit),
                "supervised": fit_start_head("la", x, y, 6, unlabeled=None, **fit)}
    assert not torch.equal(expected["semi"].weight, expected["supervised"].weight)
    for setting, head in expected.items():
        cfg = load_config(None, [f"run.dir={tmp_path / setting}", "run.steps=0", "model.init_head_steps=40",
                                 "run.seed=3", "optim.weight_decay=5e-4", f"selmix.setting={setting}",
                                 "log.progress=false"])
        assert cfg.model.init_head == "auto"
        Trainer(cfg, data).close()
        start = torch.load(tmp_path / setting / "init_head.pt", weights_only=True)
        assert torch.equal(start["weight"], head.weight.detach()) and torch.equal(start["bias"], head.bias.detach())


def test_best_head_of_a_coverage_objective_is_chosen_by_its_violation_then_its_metric(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from synthetic_run import synthetic_data

    from selmix_dist.config import load_config
    from selmix_dist.features.sets import FeatureSet
    from selmix_dist.train.trainer import Trainer

    clean = synthetic_data()
    k, alpha = 6, 0.95  # every class predicted for ≥ 95 % of its share: not met by any head here
    # A noisier validation set, so that the heads' mean recall and coverage move apart between refreshes.
    noise = 4.0 * torch.randn(clean.val.features.shape, generator=torch.Generator().manual_seed(0))
    data = dataclasses.replace(clean, val=FeatureSet(clean.val.features + noise, clean.val.labels, "val"))
    seen = []  # (step, mean recall, total coverage shortfall) of each head offered as the best, computed here
    cfg = load_config(None, [f"run.dir={tmp_path}", *COMMON, "objective.name=mean_recall_min_coverage",
                             f"objective.params.alpha={alpha}", "log.progress=false"])
    trainer = Trainer(cfg, data)
    offer = trainer.checkpointer.save_if_best

    def measured(step, metric, payload, **kw):
        with torch.no_grad():
            pred = trainer.plain_head()(data.val.features).argmax(1)
        y = data.val.labels
        recall = [float(((pred == c) & (y == c)).sum() / (y == c).sum()) for c in range(k)]
        cov = torch.bincount(pred, minlength=k).double() / len(y)
        seen.append((step, sum(recall) / k, float((alpha / k - cov).clamp_min(0).sum())))
        return offer(step, metric, payload, **kw)

    trainer.checkpointer.save_if_best = measured
    trainer.run()
    trainer.close()
    assert [s for s, _, _ in seen] == [0, 10, 20, 30, 40, 50, 60]
    # by hand: the smallest shortfall, then the largest mean recall, the earliest step on a tie
    expected = min(seen, key=lambda t: (round(t[2], 12), -round(t[1], 12), t[0]))[0]
    by_metric_alone = max(seen, key=lambda t: (round(t[1], 12), -t[0]))[0]
    assert expected != by_metric_alone  # a case where the old rule (the metric alone) chose another head
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["step"] == expected


def _noisy_val_data():
    """The synthetic data with a noisier validation set, on which no head of a plain run meets the coverage
    floor α/K = 0.95/6 (24 of the 150 validation rows per class)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from synthetic_run import synthetic_data

    from selmix_dist.features.sets import FeatureSet

    clean = synthetic_data()
    noise = 4.0 * torch.randn(clean.val.features.shape, generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(clean, val=FeatureSet(clean.val.features + noise, clean.val.labels, "val"))


def _starve_class_0_after_the_last_step(trainer) -> None:
    """A fault after the last step (no refresh follows it): class 0 is predicted nowhere until a floor lifts it."""
    if trainer.step == trainer.cfg.run.steps:
        with torch.no_grad():
            trainer.plain_head().bias[0] -= 100.0


def test_coverage_floor_holds_at_every_refresh_and_at_the_end(tmp_path):
    from selmix_dist.config import load_config
    from selmix_dist.train.trainer import Trainer

    data, k = _noisy_val_data(), 6
    need = math.ceil(0.95 * len(data.val) / k)
    fewest = {}   # floor on/off → the fewest validation predictions of any class, per offered head, counted here
    for floor in (False, True):
        # With the floor, 55 steps: the last 5 come after the last refresh, and the final head gets the floor too.
        cfg = load_config(None, [f"run.dir={tmp_path / str(floor)}", *COMMON, "objective.name=h_mean_min_coverage",
                                 f"selmix.coverage_floor={str(floor).lower()}", f"run.steps={55 if floor else 60}",
                                 "log.progress=false"])
        trainer = Trainer(cfg, data, hooks=[_starve_class_0_after_the_last_step] if floor else [])
        offer, seen = trainer.checkpointer.save_if_best, []

        def measured(step, metric, payload, offer=offer, seen=seen, **kw):
            head = payload()["head"]   # the head best.pt would hold
            pred = (data.val.features @ head["weight"].T + head["bias"]).argmax(1)
            seen.append(int(torch.bincount(pred, minlength=k).min()))
            return offer(step, metric, payload, **kw)

        trainer.checkpointer.save_if_best = measured
        trainer.run()
        with torch.no_grad():
            seen.append(int(torch.bincount(trainer.plain_head()(data.val.features).argmax(1), minlength=k).min()))
        trainer.close()
        fewest[floor] = seen
    assert len(fewest[True]) == 7 and min(fewest[True]) >= need    # 6 refreshes and the final head
    assert min(fewest[False]) < need                               # without it the floor is missed here


def test_coverage_floor_measures_a_floored_copy_and_leaves_the_training_head(tmp_path):
    """A refresh measures the floored copy of the head (checked against core.plugin.coverage_floor on the logits
    computed here) and never moves the training head, interrupted or not: steps from a floored head fight the
    floor (docs/method.md §2.6)."""
    from selmix_dist.config import load_config
    from selmix_dist.core import confusion_counts
    from selmix_dist.core.plugin import coverage_floor
    from selmix_dist.heads.plugin import head_logits
    from selmix_dist.train.evaluator import Interrupted
    from selmix_dist.train.trainer import Trainer

    data = _noisy_val_data()
    cfg = load_config(None, [f"run.dir={tmp_path}", *COMMON, "objective.name=mean_recall_min_coverage",
                             "selmix.coverage_floor=true", "log.progress=false"])
    trainer = Trainer(cfg, data)
    head = trainer.plain_head()
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    with pytest.raises(Interrupted):
        trainer.refresher.refresh(head, 0, lambda: True)
    assert trainer.refresher.step is None
    record = trainer.refresher.refresh(head, 0, lambda: False)
    assert trainer.refresher.step == 0
    assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias)
    shift = coverage_floor(head_logits(head, data.val.features), 0.95)
    assert shift.max() > shift.min()   # this start head misses the floor, so the copy differs from it
    floored = record.floored_head
    assert torch.equal(floored.weight, weight) and torch.equal(floored.bias, (bias.double() + shift).float())
    with torch.no_grad():
        pred = floored(data.val.features).argmax(1)
    assert torch.equal(record.counts, confusion_counts(data.val.labels, pred, 6))
    assert record.counts.sum(dim=0).min() >= math.ceil(0.95 * len(data.val) / 6)
    trainer.close()


def test_coverage_floor_run_resumes_bitwise_after_kill9(tmp_path):
    floor = ["objective.name=mean_recall_min_coverage", "selmix.coverage_floor=true"]
    ok(run_script(tmp_path / "ref", *floor))
    assert run_script(tmp_path / "run", *floor, "--kill-at", "37").returncode == -signal.SIGKILL
    ok(run_script(tmp_path / "run", *floor))
    ref, got = final_head(tmp_path / "ref"), final_head(tmp_path / "run")
    assert torch.equal(ref["weight"], got["weight"]) and torch.equal(ref["bias"], got["bias"])
    assert history(tmp_path / "run") == history(tmp_path / "ref")
