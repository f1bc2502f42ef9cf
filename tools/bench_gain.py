"""Benchmark one SelMix refresh of the core maths (``selmix_refresh``: C and prototypes from the validation
statistics, update_multipliers, gradient, gain_matrix, P), per (objective, K), on synthetic statistics/head.

Peak memory is the extra memory the refresh needs on top of its inputs:
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the refresh;
* CPU ("rss_hwm"): peak resident set size (``VmHWM`` of /proc/self/status, reset through
  /proc/self/clear_refs) minus the RSS before the refresh, measured on a separate, untimed refresh after
  glibc was told to mmap every block ≥ 64 KiB (so freed tensors leave the RSS and are not silently
  reused). tracemalloc cannot be used: it does not see torch's allocations. Where /proc or glibc are
  unavailable it falls back to the growth of ``resource.getrusage().ru_maxrss``, which only sees a new
  process-wide peak ("ru_maxrss_growth(lower_bound)").

GEMM units: every timed refresh is followed by one float64 K×K×K product and one K×d×K product on the same
device (alternating, so a load change on a shared machine hits both alike); medians ``gemm_kkk_ms`` and
``gemm_kdk_ms``. ``refresh_gemm_units`` = refresh / K×K×K product. The floor is the refresh's own products
(``core.gain.gemm_floor``: 4 K×K×K + 2 K×d×K for K ≤ d, 3 + 3 above): ``floor_gemm_units`` = 4 + 2d/K or
3 + 3d/K by flop count, ``floor_ms`` = the same count of the products as timed, and ``ratio_to_floor`` =
refresh / floor_ms, the refresh's overhead over its matrix products (1.0: nothing but the products).

    python tools/bench_gain.py --classes 10 100 1000 --dim 2048 --repeats 5 [--device cuda] [--json]
        [--variant official] [--temperature-rule support] [--no-memory]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from selmix_dist.core import (
    GAIN_VARIANTS,
    OBJECTIVES,
    TEMPERATURE_RULES,
    RefreshSettings,
    build_objective,
    confusion_counts,
    head_tail_masks,
    selmix_refresh,
)
from selmix_dist.core.gain import gemm_floor

# goals for the 2-core development CPU (information only; nothing asserts on time)
CPU_GOALS_MS = {100: 10.0, 1000: 500.0}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _return_freed_memory_to_os() -> bool:
    """Make glibc serve blocks ≥ 64 KiB with their own mmap (unmapped on free) and trim the heap, so that
    RSS follows the live tensors instead of memory freed earlier and kept by malloc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Context manager measuring the peak extra memory (bytes) of the enclosed code."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
        elif _return_freed_memory_to_os() and _reset_peak_rss() and _status_kib("VmRSS") is not None:
            self._base = _status_kib("VmRSS") * 1024
            self.method = "rss_hwm"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss_growth(lower_bound)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss_hwm":
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self._base)


def make_inputs(k: int, dim: int, device: torch.device, seed: int):
    """Validation counts int64 [K, K] and feature sums float64 [K, d] (20 samples per class), head (W, b)
    float32 on ``device``, head mask."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, dim, generator=g).relu_()  # prototypes: pooled post-ReLU-like features
    w = torch.randn(k, dim, generator=g) / dim**0.5
    b = 0.1 * torch.randn(k, generator=g)
    # validation set: 20 per class; predictions right 60% of the time
    labels = torch.arange(k).repeat_interleave(20)
    wrong = torch.randint(0, k, labels.shape, generator=g)
    preds = torch.where(torch.rand(labels.shape, generator=g) < 0.6, labels, wrong)
    counts = confusion_counts(labels, preds, k)
    sums = (20 * z).to(torch.float64)
    train_counts = (1000 * 0.01 ** (torch.arange(k) / max(k - 1, 1))).long()  # ρ = 100 long tail
    head, _ = head_tail_masks(train_counts)
    return counts, sums.to(device), w.to(device), b.to(device), head


def settings_of(args: argparse.Namespace) -> RefreshSettings:
    return RefreshSettings(temperature=0.1, temperature_rule=args.temperature_rule, gain_variant=args.variant,
                           include_bias=args.include_bias)


def timed_ms(fn, device: torch.device) -> float:
    """Wall-clock milliseconds of ``fn()``, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


class GemmReference:
    """One float64 K×K×K and one K×d×K product, the units of a refresh's cost; ``time()`` runs both once."""

    def __init__(self, k: int, d: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(1)
        self.k, self.d, self.device = k, d, device
        self.square = torch.rand(k, k, generator=g, dtype=torch.float64).to(device)
        self.tall = torch.rand(k, d, generator=g, dtype=torch.float64).to(device)
        self.kkk_ms: list[float] = []
        self.kdk_ms: list[float] = []

    def time(self) -> None:
        self.kkk_ms.append(timed_ms(lambda: self.square @ self.square, self.device))
        self.kdk_ms.append(timed_ms(lambda: self.tall @ self.tall.T, self.device))

    def fields(self, refresh_ms: float) -> dict:
        """The GEMM-unit fields of a refresh of median ``refresh_ms`` (see the module docstring)."""
        kkk, kdk = statistics.median(self.kkk_ms), statistics.median(self.kdk_ms)
        n_kkk, n_kdk = gemm_floor(self.k, self.d)
        floor_ms = n_kkk * kkk + n_kdk * kdk
        return {
            "gemm_kkk_ms": round(kkk, 3),
            "gemm_kdk_ms": round(kdk, 3),
            "refresh_gemm_units": round(refresh_ms / kkk, 3),
            "floor_gemm_units": round(n_kkk + n_kdk * self.d / self.k, 3),
            "floor_ms": round(floor_ms, 3),
            "ratio_to_floor": round(refresh_ms / floor_ms, 3),
        }


def time_row(name: str, k: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Timing of one (objective, K): warm-up, then ``args.repeats`` timed refreshes, each followed by the
    two reference products (``GemmReference``)."""
    counts, sums, w, b, head = make_inputs(k, args.dim, device, args.seed)
    obj = build_objective(name, k, head=head)
    settings = settings_of(args)
    reference = GemmReference(k, args.dim, device)
    P = selmix_refresh(counts, sums, w, b, obj, settings).distribution  # warm-up (allocator, kernels, BLAS)
    if not bool(torch.isfinite(P).all()):
        raise RuntimeError(f"{name}, K={k}: the refresh produced a non-finite distribution")
    reference.time()
    reference.kkk_ms.clear()
    reference.kdk_ms.clear()
    times = []
    for _ in range(args.repeats):
        times.append(timed_ms(lambda: selmix_refresh(counts, sums, w, b, obj, settings), device))
        reference.time()
    median_ms = statistics.median(times)
    goal = CPU_GOALS_MS.get(k) if device.type == "cpu" else None
    return {
        "objective": name,
        "K": k,
        "d": args.dim,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "median_ms": round(median_ms, 3),
        "min_ms": round(min(times), 3),
        "gemm_ref_ms": round(statistics.median(reference.kkk_ms), 3),  # = gemm_kkk_ms (older name)
        **reference.fields(median_ms),
        "load_1min": round(os.getloadavg()[0], 2),
        "goal_ms": goal,
        "within_goal": None if goal is None else median_ms <= goal,
    }


def measure_memory(row: dict, args: argparse.Namespace, device: torch.device) -> None:
    """Adds ``peak_mib`` and ``mem_method`` to ``row`` (one untimed refresh on fresh inputs)."""
    counts, sums, w, b, head = make_inputs(row["K"], args.dim, device, args.seed)
    obj = build_objective(row["objective"], row["K"], head=head)
    with PeakMemory(device) as mem:
        selmix_refresh(counts, sums, w, b, obj, settings_of(args))
    row["peak_mib"] = round(mem.peak_bytes / 2**20, 2)
    row["mem_method"] = mem.method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--objectives", nargs="+", default=sorted(OBJECTIVES), choices=sorted(OBJECTIVES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda only where available)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", default="exact", choices=GAIN_VARIANTS)
    parser.add_argument("--temperature-rule", default="absolute", choices=TEMPERATURE_RULES)
    parser.add_argument("--include-bias", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY for the run (re-executes itself to apply it). passive (default): idle OpenMP "
        "threads sleep instead of spinning, which avoids 10-50x stalls on a shared, oversubscribed CPU; "
        "inherit: keep the environment's setting",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the untimed peak-memory refresh of each row (peak_mib: null)")
    args = parser.parse_args(argv)
    wanted = args.omp_wait_policy.upper()
    if args.omp_wait_policy != "inherit" and os.environ.get("OMP_WAIT_POLICY") != wanted:
        # the OpenMP runtime reads the policy once, at start-up: restart the interpreter with it set
        os.environ["OMP_WAIT_POLICY"] = wanted
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.repeats < 1 or args.dim < 1 or min(args.classes) < 1:
        parser.error("--repeats, --dim and --classes must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    header = (
        f"{'objective':36s} {'K':>6s} {'d':>5s} {'median ms':>10s} {'min ms':>9s} {'peak MiB':>9s} "
        f"{'K³ GEMM ms':>10s} {'units':>6s} {'floor':>6s} {'ratio':>6s}  goal"
    )
    if not args.json:
        print(
            f"# device={device} threads={torch.get_num_threads()} variant={args.variant} "
            f"temperature_rule={args.temperature_rule} "
            f"include_bias={args.include_bias} repeats={args.repeats} "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        )
        print(header)
    # all timings first: the CPU memory measurement changes glibc's allocation policy (PeakMemory)
    rows = [time_row(name, k, args, device) for k in args.classes for name in args.objectives]
    for row in rows:
        if args.no_memory:
            row.update(peak_mib=None, mem_method="skipped")
        else:
            measure_memory(row, args, device)
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        goal = "" if row["goal_ms"] is None else f"≤{row['goal_ms']:g} ms {'ok' if row['within_goal'] else 'MISSED'}"
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        print(
            f"{row['objective']:36s} {row['K']:6d} {args.dim:5d} {row['median_ms']:10.2f} {row['min_ms']:9.2f} "
            f"{peak:>9s} {row['gemm_kkk_ms']:10.2f} {row['refresh_gemm_units']:6.2f} {row['floor_gemm_units']:6.2f} "
            f"{row['ratio_to_floor']:6.3f}  {goal}",
            flush=True,
        )
    if not args.json:
        print(f"# peak memory: {rows[-1]['mem_method']}; K³ GEMM ms: one float64 K×K×K product, timed after each "
              "refresh (median); units = refresh / K³ GEMM; floor = 4 + 2d/K (K ≤ d) or 3 + 3d/K; "
              "ratio = refresh / (the floor's products as timed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
