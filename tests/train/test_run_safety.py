"""Run safety: nothing lost, nothing misrecorded, one run per directory (each case failed before the fix)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))
from test_trainer import COMMON, SCRIPT, _tree_digest, final_head, history, ok, run_script  # noqa: E402

from selmix_dist.train.lock import RunLock, RunLockedError  # noqa: E402


def test_a_foreign_non_empty_directory_is_refused_and_untouched(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model_final.pth").write_bytes(b"someone else's model")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "precious.txt").write_text("another tool's events")
    before = _tree_digest(tmp_path)
    for extra in ((), ("run.overwrite=true", "run.resume=never")):
        proc = run_script(tmp_path, *extra)
        assert proc.returncode != 0 and "holds no selmix_dist manifest" in proc.stderr
        assert _tree_digest(tmp_path) == before


def test_an_empty_run_dir_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "run.dir="], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: config key 'run.dir' is empty" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_overwrite_removes_only_listed_artifacts(tmp_path):
    ok(run_script(tmp_path, "run.steps=20"))
    (tmp_path / "tb" / "precious.txt").write_text("mine")
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert "checkpoints/step_00000020.pt" in manifest["artifacts"] and manifest["status"] == "complete"
    ok(run_script(tmp_path, "run.steps=20", "run.resume=never", "run.overwrite=true", "run.seed=3"))
    assert (tmp_path / "tb" / "precious.txt").read_text() == "mine"
    assert len(list((tmp_path / "tb").glob("events.*"))) == 1


def test_rerunning_a_finished_run_changes_no_byte(tmp_path):
    ok(run_script(tmp_path, "run.steps=20"))
    before = _tree_digest(tmp_path)
    (tmp_path / "final_head.pt").unlink()  # written by the test script after each run, not by the trainer
    before.pop("final_head.pt")
    proc = ok(run_script(tmp_path, "run.steps=20"))
    assert "already complete" in proc.stderr
    after = _tree_digest(tmp_path)
    after.pop("final_head.pt")
    assert after == before


def test_resume_records_neutral_changes_and_extends_steps_smoothly(tmp_path):
    assert run_script(tmp_path, "--kill-at", "25").returncode == -signal.SIGKILL
    proc = ok(run_script(tmp_path, "log.log_every=5"))
    assert "resumed from" in proc.stderr and "at step 20" in proc.stderr
    changes = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert changes == [{"step": 20, "key": "log.log_every", "old": 10, "new": 5}]
    assert "log_every: 5" in (tmp_path / "config.yaml").read_text()
    # extending a finished run needs the explicit key; the cosine is then re-stretched over the new total
    proc = run_script(tmp_path, "log.log_every=5", "run.steps=80")
    assert proc.returncode != 0 and "run.extend_steps=true" in proc.stderr
    ok(run_script(tmp_path, "log.log_every=5", "run.steps=80", "run.extend_steps=true"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    for step in (64, 79):
        assert lr[step] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * step / 80)), rel=1e-6)
    assert final_head(tmp_path)["summary"]["step"] == 80


def test_extending_a_finished_run_keeps_every_record_of_its_last_step(tmp_path):
    """The finished run's last step has its validation, test and best-head records; the extension continues
    after them (before the fix, history.jsonl and TensorBoard lost the validation record of that step)."""
    ok(run_script(tmp_path))
    finished = history(tmp_path)
    last = finished[-1]["step"]
    assert {r["split"] for r in finished if r["step"] == last} == {"val", "test", "test_best"}
    ok(run_script(tmp_path, "run.steps=80", "run.extend_steps=true"))
    extended = history(tmp_path)
    assert extended[:len(finished)] == finished
    assert extended[len(finished):] and all(r["step"] > last for r in extended[len(finished):])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for split in ("val", "test"):
        logged = [e.step for e in acc.Scalars(f"{split}/min_recall")]
        assert logged == [r["step"] for r in extended if r["split"] == split], split


def test_lock_refuses_a_second_run_and_names_the_holder(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), *COMMON, "run.steps=100000",
                             "log.progress=false"], env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        history_file = tmp_path / "history.jsonl"
        while time.time() < deadline and '"split": "val"' not in (history_file.read_text()
                                                                   if history_file.exists() else ""):
            time.sleep(0.2)  # the first run holds the lock and has logged its first evaluation
        start = time.time()
        second = run_script(tmp_path, "run.steps=100000")
        assert second.returncode != 0 and f"PID {proc.pid} on host {socket.gethostname()}" in second.stderr
        assert time.time() - start < 60  # refused at once, not after a run (load makes absolute times loose)
        history_before = (tmp_path / "history.jsonl").read_text()
        assert history_before.count('"step": 0, "split": "val"') == 1  # nothing interleaved
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_stale_and_remote_locks(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": 0}))
    lock = RunLock(path)
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert "stale lock" in caplog.text and f"process {int(dead.stdout)}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    # another host with a fresh heartbeat: refused; with an old one: taken over
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "since": 0}))
    with pytest.raises(RunLockedError, match="PID 4242 on host node-17"):
        RunLock(path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    lock = RunLock(path, stale_after=60)
    lock.acquire()
    lock.release()


def test_diverged_head_stops_naming_the_step_and_is_never_checkpointed(tmp_path):
    proc = run_script(tmp_path, "optim.lr=1e30", "run.checkpoint_every=10", "run.signal_poll_every=1")
    assert proc.returncode != 0 and "non-finite at step" in proc.stderr
    for path in (tmp_path / "checkpoints").glob("step_*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["head"].values()), path


def test_stale_temporaries_of_a_killed_save_are_swept(tmp_path):
    assert run_script(tmp_path, "--kill-at", "25").returncode == -signal.SIGKILL
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "checkpoints" / f".step_00000040.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    ok(run_script(tmp_path))
    assert not stale.exists()


@pytest.mark.slow
def test_signal_during_a_slow_refresh_on_two_processes(tmp_path):
    """A refresh slowed to about 60 s (each of 10 validation batches per rank sleeps 6 s) is interrupted:
    checkpoint of the last step boundary within seconds, exit 0; the resumed run ends like the reference."""
    ref = tmp_path / "ref"
    ok(run_script(ref, "data.eval_batch_size=8", procs=2))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT),
           str(run), *COMMON, "--slow-val", "6", "data.eval_batch_size=8"]
    launcher = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = Path(f"{run}.pids")
    deadline = time.time() + 180
    while not (run / "history.jsonl").exists() and time.time() < deadline:  # the loop starts: first refresh
        time.sleep(0.2)
    time.sleep(3)
    signalled = time.time()
    for pid_file in pids.iterdir():
        os.kill(int(pid_file.read_text()), signal.SIGUSR1)
    out, err = launcher.communicate(timeout=300)
    took = time.time() - signalled
    assert launcher.returncode == 0, err[-3000:]
    assert [p.name for p in (run / "checkpoints").glob("step_*.pt")] == ["step_00000000.pt"]
    assert took < 45, f"{took:.0f} s from the signal to exit: the 60 s refresh was not interrupted"
    assert "signal received" in err
    ok(run_script(run, "data.eval_batch_size=8", procs=2))  # the same config, without the slow reads
    torch.testing.assert_close(final_head(run)["weight"], final_head(ref)["weight"], rtol=0, atol=1e-6)
    assert [(h["step"], h["split"]) for h in history(run)] == [(h["step"], h["split"]) for h in history(ref)]


def test_signal_during_setup_exits_cleanly_and_requeues(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeued\n")
    scontrol.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "777", "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run), *COMMON, "run.requeue=true",
                             "--setup-sleep", "30"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid_file = Path(f"{run}.pids") / "rank0"
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "during set-up" in err and (tmp_path / "requeued").read_text().split() == ["requeue", "777"]


def test_a_collapsed_p_is_reported_once(tmp_path):
    """T far below the gain's scale puts P on one pair at every refresh: one warning, naming the way out."""
    proc = ok(run_script(tmp_path / "cold", "selmix.temperature_rule=absolute", "selmix.temperature=1e-9",
                         "run.steps=50"))
    assert proc.stderr.count("P has stayed on fewer than 4 effective class pairs") == 1
    assert "selmix.temperature_rule=support" in proc.stderr
    proc = ok(run_script(tmp_path / "support", "selmix.temperature_rule=support", "run.steps=50"))
    assert "P has stayed on" not in proc.stderr
