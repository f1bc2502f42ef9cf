"""What each launcher does with a signal sent to the launcher process only (docs/distributed.md, Signals).

    OMP_NUM_THREADS=1 python tools/signal_table.py OUT_DIR [--launchers single forked accelerate torchrun]
        [--signals SIGTERM SIGUSR1 SIGINT]

Each launcher trains the synthetic feature cache of tests/scripts/synthetic_run.py (2 CPU ranks, 1 for the
single process) with `run.signal_poll_every=5`; the signal goes to the launcher 1 s after `history.jsonl`
appears. One JSON line per case: exit code, seconds from the signal to the launcher's exit, checkpoints
written, and whether ranks outlived the launcher (they are then killed). SIGINT is sent as from a terminal
(the launcher starts with SIGINT's default action even when this tool runs as a background job).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = str(REPO / "launch" / "train.py")
RUN = ["run.steps=100000", "run.refresh_every=10", "run.checkpoint_every=1000000", "run.signal_poll_every=5",
       "objective.name=min_recall", "model.init_head=la", "model.init_head_steps=50", "optim.lr=0.05",
       "optim.batch_size=32", "data.eval_batch_size=64", "model.mode=features", "log.progress=false",
       "log.tensorboard=false"]
LAUNCHERS = {
    "single": [sys.executable, TRAIN],
    "forked": [sys.executable, TRAIN, "--nproc-per-node", "2"],
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", TRAIN],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", TRAIN],
}


def write_cache(cache: Path) -> None:
    sys.path[:0] = [str(REPO / "tests" / "scripts"), str(REPO / "tests")]
    from synthetic_run import write_synthetic_cache

    write_synthetic_cache(cache)


def signal_launcher(launcher: str, signum: signal.Signals, run_dir: Path, cache: Path,
                    timeout: float = 90) -> dict:
    """Start `launcher` on `cache`, signal it once the loop runs, and report what happened (see the module doc)."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    log = run_dir.with_name(run_dir.name + ".stderr")  # a file: a full pipe would block the launcher's writes
    with log.open("w") as stderr:
        proc = subprocess.Popen([*LAUNCHERS[launcher], f"run.dir={run_dir}", f"data.features={cache}", *RUN],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (run_dir / "history.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    sent = time.time()
    proc.send_signal(signum)
    try:
        proc.wait(timeout)
        seconds = round(time.time() - sent, 1)
    except subprocess.TimeoutExpired:
        seconds = None  # still running: killed below
    time.sleep(2)
    orphans = [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
    for process in [*ranks, psutil.Process(proc.pid)] if proc.poll() is None else ranks:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    err = log.read_text()
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    return {"launcher": launcher, "signal": signum.name, "rc": proc.returncode if seconds is not None else None,
            "seconds": seconds, "checkpoints": saved, "orphaned_ranks": len(orphans),
            "forcefully_killed": "forcefully exiting" in err, "stderr_tail": err[-3000:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    p.add_argument("--signals", nargs="+", default=["SIGTERM", "SIGUSR1", "SIGINT"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)  # never into a directory of an earlier run
    write_cache(args.out / "cache")
    for launcher in args.launchers:
        for name in args.signals:
            row = signal_launcher(launcher, signal.Signals[name], args.out / f"{launcher}_{name}",
                                  args.out / "cache")
            print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
