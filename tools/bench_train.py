"""Trainer cost at ImageNet-LT scale on synthetic features, with 1 and with 2 processes.

    python tools/bench_train.py                      # K=1000, d=1280, 115 846 / 300 000 / 20 000; 1 and 2 procs
    python tools/bench_train.py --procs 1 --json     # one JSON object per row
    python tools/bench_train.py --classes 100 --labeled 20000 --unlabeled 50000 --val 5000   # smaller

Prints, per world size: the time of one training step (batch `--batch-size` per rank), the mean of
`--refreshes` consecutive refreshes split into evaluation (validation pass + pseudo-labelling of the rank's
unlabeled shard, every `--pseudo-label-every` refreshes), all-reduce/gather,
gain (multipliers, G, P), broadcast and sampler rebuild, the refresh in units of training steps (goal: < 10),
and peak resident memory per rank. The 2-process rows are measured by re-launching this script under
`accelerate launch` (gloo on CPU; NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selmix_dist import distributed as dist
from selmix_dist.data.synthetic import class_means, gaussian_features, long_tailed_class_counts
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.train.config import load_config
from selmix_dist.train.trainer import Trainer

COLUMNS = ("procs", "K", "d", "pseudo_every", "step_ms", "refresh_s", "eval_s", "all_reduce_s", "gain_s", "broadcast_s",
           "sampler_s", "refresh_in_steps", "peak_rss_mb")


def synthetic_imagenet_lt(args) -> TrainData:
    """Seeded Gaussian-class features with an ImageNet-LT-like labeled profile (1280 → 5 per class)."""
    k, d = args.classes, args.dim
    means = class_means(k, d, seed=0)
    counts = long_tailed_class_counts(1280, 256, k)
    counts = (counts.double() * args.labeled / counts.sum()).round().clamp_min(1).long()
    lab = gaussian_features(counts, means, 0, "labeled")
    unl = gaussian_features(torch.full((k,), -(-args.unlabeled // k)), means, 0, "unlabeled")
    val = gaussian_features(torch.full((k,), -(-args.val // k)), means, 0, "val")
    return TrainData(labeled=FeatureSet(*lab, "labeled"), val=FeatureSet(*val, "val"),
                     partners=FeatureSet(unl[0], torch.full_like(unl[1], -1), "unlabeled"))


def measure(args) -> dict[str, float]:
    data = synthetic_imagenet_lt(args)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run.dir={tmp}/run", "log.progress=false", "log.tensorboard=false",
                                 f"optim.batch_size={args.batch_size}", f"objective.name={args.objective}",
                                 f"data.eval_batch_size={args.eval_batch_size}", "run.resume=never",
                                 f"selmix.pseudo_label_every={args.pseudo_label_every}"])
        head = torch.nn.Linear(args.dim, args.classes)
        torch.nn.init.normal_(head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
        trainer = Trainer(cfg, data, init_head=head)
        trainer.refresh()  # warm-up: allocations, first GEMMs
        refreshes = []
        for _ in range(args.refreshes):  # consecutive refreshes, so pseudo-labelling is amortised as in a run
            trainer.step += cfg.run.refresh_every
            refreshes.append(trainer.refresh().timings)
        for _ in range(3):
            trainer.train_step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
            trainer.step += 1
        dist.barrier()
        step_s = (time.perf_counter() - t0) / args.steps
        mean = {k: sum(r[k] for r in refreshes) / len(refreshes) for k in refreshes[0]}
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
        _, world = dist.world_info()
        row = {"procs": world, "K": args.classes, "d": args.dim, "pseudo_every": args.pseudo_label_every,
               "step_ms": 1e3 * step_s, "refresh_s": mean["total"], "eval_s": mean["eval"],
               "all_reduce_s": mean["all_reduce"], "gain_s": mean["gain"], "broadcast_s": mean["broadcast"],
               "sampler_s": mean["sampler"], "refresh_in_steps": mean["total"] / step_s,
               "peak_rss_mb": float(dist.all_reduce_max(peak))}
        trainer.close()
    return row


def launch_two(args, argv: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if not torch.cuda.is_available() else dict(os.environ)
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", __file__, *argv, "--worker-out", str(out)]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--labeled", type=int, default=115846)
    p.add_argument("--unlabeled", type=int, default=300000)
    p.add_argument("--val", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=8192)
    p.add_argument("--objective", default="min_recall")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--refreshes", type=int, default=2, help="timed refreshes (after one warm-up)")
    p.add_argument("--pseudo-label-every", type=int, default=1, help="selmix.pseudo_label_every")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:  # a rank of the 2-process measurement
        row = measure(args)
        if dist.is_main_process():
            Path(args.worker_out).write_text(json.dumps(row))
        return 0
    argv = [a for a in sys.argv[1:] if a not in ("--json",)]
    argv = _without(argv, "--procs")
    rows = [measure(args) if n == 1 else launch_two(args, argv) for n in args.procs]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(" | ".join(f"{c:>16s}" for c in COLUMNS))
    for row in rows:
        print(" | ".join(f"{row[c]:>16.4g}" if isinstance(row[c], float) else f"{row[c]:>16}" for c in COLUMNS))
    return 0


def _without(argv: list[str], flag: str) -> list[str]:
    """argv without `flag` and the values that follow it."""
    out, skipping = [], False
    for a in argv:
        if a == flag:
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
