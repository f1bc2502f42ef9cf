"""Measurements tools/gpu_check.py runs in a subprocess of their own (so that its budget can kill them):

    python tools/gpu_probe.py syncs --cache DIR --out FILE [--steps 50] [--batch-size 256]
    python tools/gpu_probe.py tiny-cache --cache DIR

syncs: a Trainer on the feature cache DIR (the splits tools/bench_train.py writes: labeled, val, and
unlabeled when present), read through the trainer's reader as bench_train does, with a seeded head; after
one refresh and 3 warm-up steps, `--steps` calls of `train_step()` (no monitor, so nothing is logged, as
between two polls of the training loop) under `torch.cuda.set_sync_debug_mode("warn")`: every host
synchronisation a step causes is a warning, counted here with the Python line that caused it. Also the
GPU memory peak (`torch.cuda.max_memory_allocated`) over the refresh and the steps. On a CPU there is no
host synchronisation to count: the JSON says so (null counts) and still times the steps.

tiny-cache: the trainer tests' 6-class synthetic feature cache (tests/scripts/synthetic_run.py), the input
of gpu_check's launch step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SYNC_WARNING = "synchronizing CUDA operation"  # the text of torch's sync-debug warning


def cache_data(cache: Path):
    """TrainData of the cache's splits through the trainer's reader (unlabeled as partners when present)."""
    from selmix_dist.features.reader import open_features
    from selmix_dist.features.sets import FeatureSet, TrainData

    splits = [p.name for p in cache.iterdir() if p.is_dir()]
    sets = {}
    for split in ("labeled", "unlabeled", "val"):
        if split in splits:
            reader = open_features(cache, split)
            sets[split] = FeatureSet(reader, reader.labels, split)
    return TrainData(labeled=sets["labeled"], val=sets["val"], partners=sets.get("unlabeled"))


def count_syncs(work: Callable[[], object]) -> dict[str, int]:
    """Host synchronisations `work()` causes on CUDA: {"file:line" of the Python call that synchronised: count}."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message)))


def train_steps(trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step()


def syncs(args: argparse.Namespace) -> dict:
    from selmix_dist.config import load_config
    from selmix_dist.train.trainer import Trainer

    data = cache_data(args.cache)
    k, d = data.num_classes, data.labeled.num_features
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as work:
        head = torch.nn.Linear(d, k)
        torch.nn.init.normal_(head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
        torch.save(head.state_dict(), f"{work}/head.pt")
        cfg = load_config(None, [f"run.dir={work}/run", "log.progress=false", "log.tensorboard=false",
                                 "run.resume=never", f"model.init_head={work}/head.pt",
                                 f"optim.batch_size={args.batch_size}", f"data.eval_batch_size={args.eval_batch_size}",
                                 f"selmix.setting={'semi' if data.partners is not None else 'supervised'}"])
        trainer = Trainer(cfg, data)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.refresher.refresh(trainer.plain_head(), trainer.step, lambda: False)
        train_steps(trainer, 3)  # warm-up: kernels, allocator
        row: dict = {"K": k, "d": d, "N_lab": len(data.labeled), "N_val": len(data.val),
                     "N_unl": 0 if data.partners is None else len(data.partners), "batch_size": args.batch_size,
                     "steps": args.steps, "device": str(trainer.acc.device)}
        if cuda:
            # positive control: one .item() must be seen, else a count of 0 would prove nothing
            control = sum(count_syncs(lambda: torch.ones(1, device="cuda").sum().item()).values())
            sources = count_syncs(lambda: train_steps(trainer, args.steps))
            total = sum(sources.values())
            row.update(sync_counter_control=control, sync_sources=sources)
            if control:
                row.update(host_syncs=total, host_syncs_per_step=total / args.steps)
            else:
                row.update(host_syncs=None, host_syncs_per_step=None,
                           host_syncs_reason="the counter saw no synchronisation in .item() (its control): "
                                             "torch's sync-debug warnings did not reach Python here")
        else:
            row.update(host_syncs=None, host_syncs_per_step=None,
                       host_syncs_reason="CPU run: host synchronisations exist on CUDA only")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_steps(trainer, args.steps)
        if cuda:
            torch.cuda.synchronize()
        row["step_ms"] = 1e3 * (time.perf_counter() - t0) / args.steps
        row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        trainer.close()
    return row


def tiny_cache(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "scripts")]
    from synthetic_run import write_synthetic_cache

    write_synthetic_cache(args.cache)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    s = sub.add_parser("syncs", help="host synchronisations per train step and the GPU memory peak")
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True, help="JSON file to write")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--eval-batch-size", type=int, default=8192)
    t = sub.add_parser("tiny-cache", help="the trainer tests' synthetic feature cache")
    t.add_argument("--cache", type=Path, required=True)
    args = p.parse_args()
    if args.probe == "tiny-cache":
        tiny_cache(args)
        return 0
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.out.write_text(json.dumps(syncs(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
