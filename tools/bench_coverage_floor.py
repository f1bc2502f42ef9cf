"""Benchmark the coverage floor (``core.plugin.coverage_floor``, docs/method.md §2.6), the bias auction that
``selmix.coverage_floor`` runs at every refresh, per K, on synthetic long-tailed validation logits.

The logits are those of an uncorrected long-tailed head (each row's true class +1, a tilt of ``--tilt`` logits
from the first class to the last, Gaussian noise), ``--per-class`` validation rows per class, α = 0.95. The
auction's work grows with the classes it has to raise, so the table gives how many were short before, how
many it raised, whether every class reached the floor, and the median time of ``--repeats`` calls. ``--warm``
starts from the floored logits nudged by the noise of ``--warm`` logits: the situation of a refresh after 50
steps, where most classes are still on the floor.

    python tools/bench_coverage_floor.py --classes 100 200 1000 --per-class 50 [--repeats 3] [--warm 0.1] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from selmix_dist.core.plugin import coverage_floor

ALPHA = 0.95


def synthetic_logits(k: int, per_class: int, tilt: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per_class)
    logits = 1.5 * torch.randn(k * per_class, k, generator=g)
    logits[torch.arange(k * per_class), labels] += 1.0
    return logits - torch.linspace(0.0, tilt, k)


def measure(k: int, per_class: int, tilt: float, repeats: int, warm: float) -> dict:
    logits = synthetic_logits(k, per_class, tilt).double()
    if warm:
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        logits = logits + coverage_floor(logits, ALPHA) + warm * noise
    need = math.ceil(ALPHA * per_class - 1e-9)
    short = int((torch.bincount(logits.argmax(1), minlength=k) < need).sum())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        shift = coverage_floor(logits, ALPHA)
        times.append(time.perf_counter() - t0)
    fewest = int(torch.bincount((logits + shift).argmax(1), minlength=k).min())
    return {"K": k, "V": k * per_class, "need": need, "short_before": short,
            "raised": int((shift > shift.min()).sum()), "met": fewest >= need, "fewest_after": fewest,
            "median_s": statistics.median(times), "warm_noise": warm, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100, 200, 1000])
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--tilt", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args()
    rows = [measure(k, args.per_class, args.tilt, args.repeats, args.warm) for k in args.classes]
    if args.json:
        print(json.dumps({"tool": "bench_coverage_floor", "alpha": ALPHA, "results": rows}, indent=1))
        return
    print("| K | V | need | short before | raised | floor met | median s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['V']} | {r['need']} | {r['short_before']} | {r['raised']} | "
              f"{'yes' if r['met'] else 'no'} | {r['median_s']:.3f} |")


if __name__ == "__main__":
    main()
