"""Memory and time of the start head's L-BFGS fit (`model.init_head=la|ce`): row blocks against one block.

    python tools/bench_start_head.py                       # ImageNet-LT size: 115 928 × 1280, K = 1000, 2 iterations
    python tools/bench_start_head.py --labeled 20000 --classes 8142 --dim 2048 --iters 1
    python tools/bench_start_head.py --json                # one JSON object per row

Each row runs in a fresh process (its peak RSS is its own): seeded Gaussian features float32[N, d] and balanced
labels, then `fit_head(..., loss="logit_adjusted", max_iter=--iters)`. `blocks` is the library's objective
(rows in blocks of BLOCK_LOGITS logits, each converted to float64 when used); `one_block` sets the block above
N·K, which is the fit as it was before: an [N, K] float64 logit matrix and a float64 copy of the features.
Columns: peak RSS, peak above the features (what the fit itself holds), seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("blocks", "one_block")


def worker(mode: str, n: int, d: int, k: int, iters: int) -> dict:
    import torch

    from selmix_dist.heads import fit

    if mode == "one_block":
        fit.BLOCK_LOGITS = n * k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    y = torch.arange(n)[torch.randperm(n, generator=gen)] % k  # every class present (the LA prior needs it)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    fit.fit_head(x, y, k, loss="logit_adjusted", weight_decay=5e-4, max_iter=iters)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "N": n, "d": d, "K": k, "iters": iters, "block_rows": min(n, max(1, fit.BLOCK_LOGITS // k)),
            "peak_rss_gib": peak, "fit_gib": peak - before, "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labeled", type=int, default=115928)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=2, help="L-BFGS iterations (max_iter)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.labeled, args.dim, args.classes, args.iters) < 1 or args.labeled < args.classes:
        p.error("--labeled, --dim, --classes and --iters must be >= 1, and --labeled >= --classes")
    if args.worker:
        print(json.dumps(worker(args.worker, args.labeled, args.dim, args.classes, args.iters)))
        return 0
    rows = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--labeled", str(args.labeled), "--dim",
                              str(args.dim), "--classes", str(args.classes), "--iters", str(args.iters)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"error: the {mode} fit failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.splitlines()[-1]))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print("mode | N | d | K | iters | block rows | peak RSS | fit holds | seconds")
    for r in rows:
        print(f"{r['mode']} | {r['N']} | {r['d']} | {r['K']} | {r['iters']} | {r['block_rows']} | "
              f"{r['peak_rss_gib']:.2f} GiB | {r['fit_gib']:.2f} GiB | {r['seconds']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
