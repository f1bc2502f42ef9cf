"""launch/slurm/train.sbatch on a simulated two-node allocation, and requeue on SIGUSR1.

Fake `srun`, `scontrol` and `accelerate` executables on PATH stand in for SLURM and the launcher: `srun`
runs its command once per node with that node's SLURM_NODEID, as SLURM does, and `accelerate` records its
arguments. If the template expanded $SLURM_NODEID in the batch shell, both nodes would claim rank 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _free_port() -> int:
    """A TCP port free on this host now, for the fake allocation's master."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sbatch_gives_each_node_its_own_machine_rank(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "launch.log"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun: run the last argument (the bash -c script) once per node, like one task per node.
    _fake(bin_dir, "srun", 'for n in 0 1; do SLURM_NODEID=$n bash -c "${@: -1}"; done\n')
    _fake(bin_dir, "accelerate", f'echo "$@" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_NODEID": "0"}
    proc = subprocess.run(["bash", str(SBATCH), "configs/cifar10_lt/min_recall.yaml", "run.dir=runs/x"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        args = line.split()
        assert args[args.index("--machine_rank") + 1] == str(rank)
        assert args[args.index("--num_processes") + 1] == "8"
        assert args[args.index("--main_process_ip") + 1] == "node-a"
        assert {"run.dir=runs/x", "run.requeue=true", "run.resume=auto"} <= set(args)
    header = SBATCH.read_text()
    assert "#SBATCH --signal=USR1@120" in header and "#SBATCH --requeue" in header


def test_sigusr1_requeues_under_slurm(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", f'echo "$@" >> {calls}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "scripts" / "synthetic_run.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "--signal-at", "7",
                           "run.steps=40", "run.signal_poll_every=5", "run.requeue=true",
                           "model.init_head_steps=30"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "run" / "checkpoints" / "step_00000010.pt").exists()


def test_sbatch_with_forked_ranks_trains_on_two_simulated_nodes(tmp_path):
    """LAUNCHER=fork: each node's task forks its ranks (launch/train.py --nproc-per-node) and the nodes meet at
    the first host; run for real on this machine (two nodes of one CPU rank, started together by the fake
    srun), they train the head that two ranks of one node train."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from synthetic_run import write_synthetic_cache

    cache, bin_dir = tmp_path / "cache", tmp_path / "bin"
    write_synthetic_cache(cache)
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", 'printf "127.0.0.1\\nnode-b\\n"\n')
    _fake(bin_dir, "srun", 'for n in 0 1; do SLURM_NODEID=$n bash -c "${@: -1}" & done; wait -n && wait -n\n')
    _fake(bin_dir, "python", f'exec {sys.executable} "$@"\n')  # the environment's interpreter
    port = _free_port()
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{steps: 40, refresh_every: 10, checkpoint_every: 20}}\n"
                      f"data: {{features: {cache}, eval_batch_size: 64}}\n"
                      "model: {mode: features, init_head: la, init_head_steps: 30}\n"
                      "optim: {batch_size: 32, lr: 0.05}\nlog: {progress: false, tensorboard: false}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "LAUNCHER": "fork", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SBATCH), str(config), f"run.dir={tmp_path / 'slurm'}"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    one_node = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config),
                               "--nproc-per-node", "2", f"run.dir={tmp_path / 'one_node'}"],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    heads = [torch.load(tmp_path / name / "checkpoints" / "step_00000040.pt", weights_only=False)["head"]
             for name in ("slurm", "one_node")]
    assert all(torch.equal(heads[0][key], heads[1][key]) for key in heads[1])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "fork"])
def test_sigusr1_to_every_process_of_the_step_checkpoints_and_requeues_with_either_launcher(tmp_path, launcher):
    """What `#SBATCH --signal=USR1@120` does: SIGUSR1 to every process of the job step (the srun task, the
    launcher, the ranks), not to the batch shell. The template's `trap "" USR1` keeps `accelerate launch` (which
    SIGUSR1 kills at once, leaving its ranks running without it) and the forked launcher alive; the ranks
    checkpoint, rank 0 requeues the job, and the step ends with 0. One simulated node of two CPU ranks."""
    import psutil
    import torch

    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from synthetic_run import write_synthetic_cache

    cache, bin_dir, requeued = tmp_path / "cache", tmp_path / "bin", tmp_path / "requeued"
    write_synthetic_cache(cache)
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", f'if [ "$1" = requeue ]; then echo "$@" >> {requeued}; else echo 127.0.0.1; fi\n')
    _fake(bin_dir, "srun", 'SLURM_NODEID=0 bash -c "${@: -1}"\n')
    _fake(bin_dir, "python", f'exec {sys.executable} "$@"\n')
    _fake(bin_dir, "accelerate", f'exec {Path(sys.executable).parent / "accelerate"} "$@"\n')
    port = _free_port()
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{steps: 100000, refresh_every: 10, checkpoint_every: 1000000, signal_poll_every: 5}}\n"
                      f"data: {{features: {cache}, eval_batch_size: 64}}\n"
                      "model: {mode: features, init_head: la, init_head_steps: 30}\n"
                      "optim: {batch_size: 32, lr: 0.05}\nlog: {progress: false, tensorboard: false}\n")
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-a",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "LAUNCHER": launcher,
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    batch = subprocess.Popen(["bash", str(SBATCH), str(config), f"run.dir={run}"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        # The step-0 record: both ranks are in the loop (its evaluation is a collective). The file alone exists
        # before rank 0 arms its handler, and a signal then ends the rank as one in set-up (exit 138, seen once).
        history = run / "history.jsonl"
        while not (history.is_file() and history.read_text().strip()) and batch.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        step = [p for p in psutil.Process(batch.pid).children(recursive=True) if p.name() != "bash"]
        assert len(step) >= 3, step  # the launcher and two ranks
        for process in step:  # SLURM signals the step's processes; the batch shell is not one of them
            process.send_signal(signal.SIGUSR1)
        _, err = batch.communicate(timeout=120)
    finally:  # nothing this test started outlives it, whatever failed
        if batch.poll() is None:
            batch.kill()
        for process in step:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert batch.returncode == 0, err[-3000:]
    assert "signal received" in err and requeued.read_text().split() == ["requeue", "4242"]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1, saved
    assert set(torch.load(run / "checkpoints" / saved[0], weights_only=False)["head"]) == {"weight", "bias"}
