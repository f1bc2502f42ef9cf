"""Every way to start ranks trains the same head: `launch/train.py --nproc-per-node` (ranks forked from one
process), `accelerate launch` and torchrun; the forked launcher's signals and errors."""

from __future__ import annotations

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
LAUNCHER = REPO / "launch" / "train.py"
BIN = Path(sys.executable).parent
RUN = ["run.steps=60", "run.refresh_every=10", "run.checkpoint_every=20", "run.test_every=30",
       "run.signal_poll_every=5", "objective.name=min_recall", "model.init_head=la", "model.init_head_steps=50",
       "optim.lr=0.05", "optim.batch_size=32", "data.eval_batch_size=64", "model.mode=features",
       "log.progress=false", "log.tensorboard=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ACCELERATE_2 = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The trainer tests' synthetic splits (6 classes, d = 16) as a feature cache: launch/train.py's input."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from synthetic_run import write_synthetic_cache

    path = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(path)
    return path


def train(prefix: list[str], run_dir: Path, cache: Path, *overrides: str, env=None, **popen):
    cmd = [*prefix, str(LAUNCHER), f"run.dir={run_dir}", f"data.features={cache}", *RUN, *overrides]
    if popen:
        return subprocess.Popen(cmd, env=env or ENV, cwd=REPO, text=True, **popen)
    return subprocess.run(cmd, env=env or ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def head(run_dir: Path, step: int = 60) -> dict[str, torch.Tensor]:
    """The head saved at `step` (the last step of RUN)."""
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=False)["head"]


@pytest.mark.slow
def test_forked_ranks_train_what_accelerate_launch_and_torchrun_train(cache, tmp_path):
    """Bit for bit. torchrun and the forked ranks run without ACCELERATE_USE_CPU: before the fix, accelerate
    then joined the process group without data parallelism, and each rank trained its own head (rank 0's was
    the one-process run's)."""
    ok(train([sys.executable], tmp_path / "one", cache))
    fork = ok(train([sys.executable], tmp_path / "fork", cache, "--nproc-per-node", "2"))
    ok(train(ACCELERATE_2, tmp_path / "accelerate", cache, env={**ENV, "ACCELERATE_USE_CPU": "1"}))
    ok(train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
             tmp_path / "torchrun", cache))
    assert "2 process(es)" in fork.stderr
    reference = head(tmp_path / "accelerate")
    assert not torch.equal(head(tmp_path / "one")["weight"], reference["weight"])  # 2 ranks' batches differ
    for name in ("fork", "torchrun"):
        for key, value in head(tmp_path / name).items():
            assert torch.equal(value, reference[key]), (name, key)


@pytest.mark.slow
def test_sigterm_to_the_forked_launcher_checkpoints_and_the_run_resumes_bitwise(cache, tmp_path):
    """SIGTERM reaches the launcher only (as from a scheduler): it is forwarded, the ranks save the latest step
    boundary and exit, the launcher exits 128 + 15; resumed, the run ends as one never interrupted."""
    long = ["--nproc-per-node", "2", "run.steps=1000", "run.checkpoint_every=100000"]
    # Threads as the trainer chooses them (no OMP_NUM_THREADS): its own rule, without accelerate's override.
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    ok(train([sys.executable], tmp_path / "reference", cache, *long, env=env))
    run = tmp_path / "run"
    launcher = train([sys.executable], run, cache, *long, env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "history.jsonl").exists() and time.time() < deadline:  # the loop is running
        time.sleep(0.1)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "signal received" in err and "OMP_NUM_THREADS" not in err
    # The ranks exited on their own: before the fix they waited in torch elastic's wrapper for the agent, which
    # had stopped polling them, until it SIGKILLed them 30 s later.
    assert "forcefully exiting" not in err and "Closing process" not in err, err[-3000:]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1 and 0 < int(saved[0][len("step_"):-len(".pt")]) < 1000, saved
    ok(train([sys.executable], run, cache, *long, env=env))
    for key, value in head(run, 1000).items():
        assert torch.equal(value, head(tmp_path / "reference", 1000)[key]), key


@pytest.mark.slow
def test_two_nodes_of_forked_ranks_train_what_one_node_trains(cache, tmp_path):
    """Two launchers (`--nnodes 2 --node-rank 0|1`, one rank each) meet at node 0's port: the same head as the
    two ranks of one node, bit for bit."""
    with socket.socket() as probe:  # a free port for node 0 to listen on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [train([sys.executable], tmp_path / "two_nodes", cache, "--nproc-per-node", "1", "--nnodes", "2",
                   "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    ok(train([sys.executable], tmp_path / "one_node", cache, "--nproc-per-node", "2"))
    for key, value in head(tmp_path / "two_nodes").items():
        assert torch.equal(value, head(tmp_path / "one_node")[key]), key


def test_a_rank_that_fails_is_named_and_its_error_kept(cache, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = train([sys.executable], tmp_path / "run", tmp_path / "no_such_cache", "--nproc-per-node", "2",
                 env={**ENV, "TMPDIR": str(scratch)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    # the launcher's per-rank error files are gone with it (torch's own caches may stay)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith(("selmix_ranks_", "torchelastic_"))]
    assert proc.stderr.count("error: ") == 3  # each rank's one-line error, then the launcher's
    assert "no_such_cache" in proc.stderr and "Traceback" not in proc.stderr
    assert "rank 0 failed with exit code 2; rank 1 failed with exit code 2" in proc.stderr


def test_forking_ranks_from_inside_a_rank_or_without_a_master_is_refused(cache, tmp_path):
    proc = train([sys.executable], tmp_path / "run", cache, "--nproc-per-node", "2",
                 env={**ENV, "LOCAL_RANK": "0"})
    assert proc.returncode == 2 and "already a rank of a launched run" in proc.stderr
    proc = train([sys.executable], tmp_path / "run", cache, "--nproc-per-node", "2", "--nnodes", "2")
    assert proc.returncode == 2 and "need the master's address as HOST:PORT" in proc.stderr
    proc = train([sys.executable], tmp_path / "run", cache, "--nnodes", "2", "--master-addr", "node-a")
    assert proc.returncode == 2 and "give --nproc-per-node too" in proc.stderr
    assert not (tmp_path / "run").exists()


SCRIPT = REPO / "tests" / "scripts" / "synthetic_run.py"


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher the test started and its ranks, if a failed test left them running."""
    import psutil

    try:
        launcher = psutil.Process(pid)
        for process in [*launcher.children(recursive=True), launcher]:
            process.kill()
    except psutil.NoSuchProcess:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_one_rank_during_set_up_ends_the_run_with_a_named_error(tmp_path, signum):
    """torchrun, one rank signalled in its set-up (before the process group exists): it exits 128 + the signal,
    the agent stops the other rank, the run fails at once naming the exit code. Before the fix the signalled
    rank exited 0 and the other waited for it in the rendezvous (the test's timeout)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(SCRIPT), str(run), "--setup-sleep", "4", "run.steps=20"], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = Path(f"{run}.pids") / "rank1"
    deadline = time.time() + 120
    while not pid_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), proc.communicate(timeout=60)[1][-3000:]
    time.sleep(0.2)  # the pid is written before the file is closed
    os.kill(int(pid_file.read_text()), signum)
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        _kill_tree(proc.pid)
    assert proc.returncode != 0, err[-3000:]
    assert f"exitcode  : {128 + signum}" in err and "during set-up" in err, err[-3000:]
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_to_one_forked_rank_during_set_up_ends_the_run_with_a_named_error(cache, tmp_path):
    """The forked launcher: a rank signalled as soon as it exists (before or after it installed its handlers)
    fails, the launcher names it and stops the other; nothing hangs or is killed by force."""
    import psutil

    launcher = train([sys.executable], tmp_path / "run", cache, "--nproc-per-node", "2", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    parent = psutil.Process(launcher.pid)

    def forked_ranks() -> list[psutil.Process]:  # the launcher's other children (a resource tracker) run other code
        try:
            return [c for c in parent.children() if c.cmdline() == parent.cmdline()]
        except psutil.NoSuchProcess:  # one exited between the listing and the look
            return []

    deadline = time.time() + 120
    while len(ranks := forked_ranks()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(max(r.pid for r in ranks), signal.SIGTERM)  # the second rank forked
    try:
        _, err = launcher.communicate(timeout=90)
    finally:
        _kill_tree(launcher.pid)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "error: rank 1 failed with exit code 143" in err and "forcefully exiting" not in err, err[-3000:]
