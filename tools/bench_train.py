"""Trainer cost at scale on a synthetic feature cache: step, refresh and memory per rank, for N processes.

    python tools/bench_train.py                          # ImageNet-LT size: K=1000, d=1280, 115 846 labeled,
                                                         # 300 000 unlabeled, 20 000 val; 1 and 2 processes
    python tools/bench_train.py --loader memory          # the in-memory loading: a float32 copy per rank
    python tools/bench_train.py --procs 2 --dim 2048 --unlabeled 1280000 --cache /scratch/bigpool
    python tools/bench_train.py --classes 8142 --labeled 437513 --unlabeled 0 --val 24426 --dim 2048 --procs 1
    python tools/bench_train.py --paired --rounds 9      # step time of both loaders, alternating in one process
    python tools/bench_train.py --procs 2 --launcher fork  # ranks forked by launch/train.py --nproc-per-node
    python tools/bench_train.py --json                   # one JSON object per row

The splits are written once into a feature cache (`--cache`, reused when it is complete and has the same
key; default a temporary directory) by the library's own writer, from seeded Gaussian classes: labeled with
an ImageNet-LT-like long-tailed profile (1280 → 5 per class, scaled to `--labeled`), unlabeled and
validation balanced (unlabeled stored with label −1). Every world size then runs in fresh processes (one:
a plain subprocess; more: each `--launcher`: `accelerate launch`, or `fork`, the ranks forked from one
process as `launch/train.py --nproc-per-node` does; gloo on CPU, NCCL on GPUs) that open the cache
(`--loader reader`: the trainer's reader, rows read from the page cache on demand; `memory`: `load_features`,
a private float32 copy),
run one warm-up refresh, `--refreshes` timed ones (consecutive, so `--pseudo-label-every` amortises as in a
run), 3 warm-up and `--steps` timed training steps. `--paired` times only steps, of both loaders in the same
processes, in alternating blocks (what a step-time comparison needs on CPUs shared with other jobs).

Columns: open (opening the splits, with checksum and inf/NaN scan), step (wall clock), step_cpu (CPU time
of the busiest rank per step: the work, less sensitive than the wall clock to other jobs on shared CPUs),
refresh and its parts (the keys of the trainer's refresh timings), refresh in steps, and per rank: peak RSS
(max over ranks), RSS at the end split into private (anon) and file-backed pages (shared libraries; mapped
cache pages with the memory loader's scan), PSS (each shared page divided among the processes mapping it)
summed over the ranks and over every process of the run (pss_node: the ranks and the launcher above them,
which holds torch too), the cache's pages in the page cache (read by the reader, one copy per node, in
nobody's PSS) and node_total = pss_node + those pages: what the node really holds for the run.
load = 1-minute load average at the end (the CPUs are shared).
GEMM units of the core refresh (the `gain` part: `core.selmix_refresh`): after every timed refresh each rank
times one float64 K×K×K and one K×d×K product on the trainer's device; gemm_kkk_ms, gemm_kdk_ms (medians),
refresh_gemm_units = gain / K×K×K product, floor_gemm_units (4 + 2d/K for K ≤ d, 3 + 3d/K above), floor_ms
and ratio_to_floor = gain / floor_ms (tools/bench_gain.py's definitions, rank 0's values).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import mmap
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selmix_dist import distributed as dist
from selmix_dist.config import load_config
from selmix_dist.data.synthetic import class_means, gaussian_features, long_tailed_class_counts
from selmix_dist.features.reader import load_features, open_features
from selmix_dist.features.sets import FeatureSet, TrainData
from selmix_dist.memory import descendants, pss_mb
from selmix_dist.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.feature_cache import write_feature_cache  # noqa: E402 - the writer shared with the tests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gain import GemmReference  # noqa: E402 - the GEMM units of tools/bench_gain.py

SPLITS = ("labeled", "unlabeled", "val")
LOADERS = ("memory", "reader")
LAUNCHERS = ("accelerate", "fork")
REFRESH_EVERY = 50  # run.refresh_every: the bench advances trainer.step by this much between refreshes


def split_labels(args) -> dict[str, torch.Tensor]:
    """The true class of every row, in class blocks: labeled long-tailed, unlabeled and val balanced."""
    k = args.classes
    profile = long_tailed_class_counts(1280, 256, k)
    counts = {"labeled": (profile.double() * args.labeled / profile.sum()).round().clamp_min(1).long(),
              "unlabeled": torch.full((k,), -(-args.unlabeled // k)), "val": torch.full((k,), -(-args.val // k))}
    return {name: torch.repeat_interleave(torch.arange(k), c) for name, c in counts.items()}


def write_inputs(args, cache: Path, head_file: Path) -> None:
    """The synthetic splits as a feature cache (a no-op when `cache` already holds them) and a seeded head."""
    head = torch.nn.Linear(args.dim, args.classes)
    torch.nn.init.normal_(head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    torch.save(head.state_dict(), head_file)
    means = class_means(args.classes, args.dim, seed=0)
    for split, labels in split_labels(args).items():
        if not len(labels):
            continue

        def rows(positions: torch.Tensor, labels=labels, split=split) -> torch.Tensor:
            # Rows are in class blocks, so a chunk's classes are its counts: one seeded draw per chunk.
            counts = torch.bincount(labels[positions], minlength=args.classes)
            return gaussian_features(counts, means, 0, f"{split}/{int(positions[0])}")[0]

        stored = torch.full_like(labels, -1) if split == "unlabeled" else labels
        write_feature_cache(cache, split, stored, rows, args.dim, name=f"gaussian(K={args.classes},d={args.dim})",
                            dtype=args.dtype)


def open_data(args, loader: str) -> TrainData:
    sets = {}
    for split in SPLITS if args.unlabeled else ("labeled", "val"):
        if loader == "reader":
            reader = open_features(args.cache, split)
            sets[split] = FeatureSet(reader, reader.labels, split)
        else:
            loaded = load_features(args.cache, split)
            sets[split] = FeatureSet(loaded.features, loaded.labels, split)
    return TrainData(labeled=sets["labeled"], val=sets["val"], partners=sets.get("unlabeled"))


def memory_mb() -> torch.Tensor:
    """[peak RSS, RSS anon, RSS file, PSS] of this process in MB."""
    status = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("RssAnon:", "RssFile:"))}
    pss = sum(int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
              if line.startswith("Pss:"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return torch.tensor([[peak, status["RssAnon"], status["RssFile"], pss]], dtype=torch.float64) / 1024


def cache_resident_mb(cache: Path) -> float:
    """MB of the cache's chunk files held in the page cache (one copy per node, shared by every rank and
    counted in no process's PSS): mincore over a map of each file that is never touched."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page, resident = os.sysconf("SC_PAGE_SIZE"), 0
    for path in Path(cache).rglob("chunk-*.safetensors"):
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
            libc.mincore(addr, size, pages)
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident += sum(b & 1 for b in pages) * page
    return resident / 2**20


def make_trainer(args, acc, data: TrainData, name: str) -> Trainer:
    """A trainer on `data` with the seeded head, after its first (warm-up) refresh and 3 warm-up steps."""
    cfg = load_config(None, [f"run.dir={args.work_dir}/{name}", "log.progress=false", "log.tensorboard=false",
                             "run.resume=never", "run.overwrite=true", f"model.init_head={args.work_dir}/head.pt",
                             f"run.refresh_every={REFRESH_EVERY}", f"optim.batch_size={args.batch_size}",
                             f"objective.name={args.objective}",
                             f"data.eval_batch_size={args.eval_batch_size}",
                             f"selmix.setting={'semi' if args.unlabeled else 'supervised'}",
                             f"selmix.pseudo_label_every={args.pseudo_label_every}"])
    trainer = Trainer(cfg, data, accelerator=acc)
    refresh(trainer)  # allocations, first GEMMs, first touch of the mapped pages
    timed_steps(trainer, 3)
    return trainer


def refresh(trainer: Trainer):
    """One refresh at the trainer's step, never interrupted (what the loop runs every run.refresh_every steps)."""
    return trainer.refresher.refresh(trainer.plain_head(), trainer.step, lambda: False)


def timed_steps(trainer: Trainer, steps: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (the busiest rank's) per training step over `steps` steps."""
    dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()  # advances trainer.step
    cpu = dist.all_reduce_max(torch.tensor([time.process_time() - cpu0])).item()
    dist.barrier()
    return (time.perf_counter() - t0) / steps, cpu / steps


def describe(args, data: TrainData) -> dict[str, float | int | str]:
    return {"procs": dist.world_info()[1], "dtype": args.dtype, "K": args.classes, "d": args.dim,
            "N_lab": len(data.labeled), "N_unl": 0 if data.partners is None else len(data.partners),
            "N_val": len(data.val), "pseudo_every": args.pseudo_label_every}


def measure(args) -> dict[str, float | int | str]:
    """One rank's part of a row (rank 0 returns the row)."""
    acc = dist.make_accelerator()
    t0 = time.perf_counter()
    data = open_data(args, args.loader)
    open_s = dist.all_reduce_max(torch.tensor([time.perf_counter() - t0])).item()
    trainer = make_trainer(args, acc, data, "run")
    reference = GemmReference(args.classes, args.dim, trainer.refresher.evaluator.device)
    refreshes = []
    for _ in range(args.refreshes):
        trainer.step += REFRESH_EVERY  # the next refresh is due as in a run (pseudo-label cadence)
        refreshes.append(refresh(trainer).timings)
        reference.time()  # interleaved with the refreshes: both see the same load
    step_s, step_cpu_s = timed_steps(trainer, args.steps)
    memory = dist.all_gather_cat(memory_mb())  # [world, 4], sampled while every rank is alive
    row = {**describe(args, data), "loader": args.loader, "launcher": args.launcher if args.world > 1 else "none"}
    trainer.close()
    timings = {key: sum(r[key] for r in refreshes) / len(refreshes) for key in refreshes[0]}
    row.update({"open_s": open_s, "step_ms": 1e3 * step_s, "step_cpu_ms": 1e3 * step_cpu_s,
                "refresh_s": timings.pop("total"), **{f"{key}_s": v for key, v in timings.items()}})
    row["refresh_in_steps"] = row["refresh_s"] / step_s
    row.update(reference.fields(1e3 * row["gain_s"]))
    peak, anon, file, _ = memory.max(0).values.tolist()  # the largest rank
    row.update(peak_rss_mb=peak, rss_anon_mb=anon, rss_file_mb=file, pss_ranks_mb=float(memory[:, 3].sum()))
    if dist.is_main_process():
        row["pss_node_mb"] = pss_mb(descendants(args.tree_root))  # sampled while the ranks wait below
        row["cache_resident_mb"] = cache_resident_mb(args.cache)
        row["node_total_mb"] = row["pss_node_mb"] + row["cache_resident_mb"]
    row["load"] = os.getloadavg()[0]
    dist.barrier()  # every rank alive until rank 0 has measured the run's processes
    return row


def measure_paired(args) -> dict[str, float | int | str]:
    """Step time of both loaders in the same processes: `--rounds` rounds of `--steps` steps of each in turn,
    so that both see the same load on shared CPUs; medians over rounds (rank 0 returns the row)."""
    acc = dist.make_accelerator()
    data = {loader: open_data(args, loader) for loader in LOADERS}
    trainers = {loader: make_trainer(args, acc, data[loader], f"run-{loader}") for loader in LOADERS}
    laps: dict[str, list[tuple[float, float]]] = {loader: [] for loader in LOADERS}
    for _ in range(args.rounds):
        for loader, trainer in trainers.items():
            laps[loader].append(timed_steps(trainer, args.steps))
    row = {**describe(args, data["reader"]), "loader": "paired", "rounds": args.rounds}
    for loader in LOADERS:
        wall, cpu = torch.tensor(laps[loader]).median(0).values.tolist()
        row.update({f"step_ms_{loader}": 1e3 * wall, f"step_cpu_ms_{loader}": 1e3 * cpu})
    row["reader_over_memory"] = row["step_ms_reader"] / row["step_ms_memory"]
    row["reader_over_memory_cpu"] = row["step_cpu_ms_reader"] / row["step_cpu_ms_memory"]
    row["load"] = os.getloadavg()[0]
    last = trainers.pop("reader")
    trainers.clear()  # the other trainer goes first; the last one tears the process group down
    gc.collect()
    last.close()
    return row


def worker_argv(args) -> list[str]:
    return [__file__, "--classes", str(args.classes), "--dim", str(args.dim), "--labeled", str(args.labeled),
            "--unlabeled", str(args.unlabeled), "--val", str(args.val), "--dtype", args.dtype,
            "--loader", args.loader, "--rounds", str(args.rounds), *(["--paired"] if args.paired else []),
            "--batch-size", str(args.batch_size),
            "--eval-batch-size", str(args.eval_batch_size), "--objective", args.objective,
            "--steps", str(args.steps), "--refreshes", str(args.refreshes),
            "--pseudo-label-every", str(args.pseudo_label_every), "--cache", str(args.cache),
            "--work-dir", str(args.work_dir), "--tree-root", str(os.getpid())]


def worker_rank(args) -> int:
    """One rank's measurement; rank 0 writes the row."""
    row = measure_paired(args) if args.paired else measure(args)
    if dist.is_main_process():
        Path(args.worker_out).write_text(json.dumps(row))
    return 0


def launch(args, procs: int, launcher: str) -> dict:
    """A row measured in fresh processes: `procs` = 1 a plain subprocess, else started by `launcher`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [*worker_argv(args), "--worker-out", str(out), "--world", str(procs), "--launcher", launcher]
        if procs == 1 or launcher == "fork":
            cmd, env = [sys.executable, *argv], dict(os.environ)
        else:
            env = dict(os.environ) if torch.cuda.is_available() else {**os.environ, "ACCELERATE_USE_CPU": "1"}
            cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                   str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", *argv]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--labeled", type=int, default=115846)
    p.add_argument("--unlabeled", type=int, default=300000, help="0: supervised setting (partners = labeled)")
    p.add_argument("--val", type=int, default=20000)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored feature dtype")
    p.add_argument("--loader", choices=LOADERS, default="reader",
                   help="reader: open_features (reads from the page cache); memory: load_features (a float32 copy "
                        "per rank)")
    p.add_argument("--cache", type=Path, default=None,
                   help="feature-cache directory (written if absent, reused if complete; default: temporary)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=8192)
    p.add_argument("--objective", default="min_recall")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--refreshes", type=int, default=2, help="timed refreshes (after one warm-up)")
    p.add_argument("--pseudo-label-every", type=int, default=1, help="selmix.pseudo_label_every")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="world sizes to measure")
    p.add_argument("--launcher", choices=LAUNCHERS, nargs="+", default=list(LAUNCHERS),
                   help="how more than one rank starts: accelerate launch, or forked from one process "
                        "(launch/train.py --nproc-per-node)")
    p.add_argument("--paired", action="store_true",
                   help="step time only, of both loaders in the same processes (alternating blocks of --steps)")
    p.add_argument("--rounds", type=int, default=5, help="--paired: blocks per loader (median)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tree-root", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(*args.procs, args.classes, args.dim, args.labeled, args.val, args.steps, args.refreshes, args.rounds) < 1:
        p.error("--procs, --classes, --dim, --labeled, --val, --steps, --refreshes and --rounds must be >= 1")
    if args.worker_out:  # one measurement: this process is its rank, or forks them
        (args.launcher,) = args.launcher
        if args.launcher == "fork" and args.world > 1:
            return dist.launch_forked(worker_rank, args.world, args)
        return worker_rank(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.cache, args.work_dir = args.cache or Path(tmp) / "cache", Path(tmp)
        t0 = time.perf_counter()
        write_inputs(args, args.cache, args.work_dir / "head.pt")
        print(f"feature cache {args.cache}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = [launch(args, n, launcher) for n in args.procs
                for launcher in (args.launcher if n > 1 else args.launcher[:1])]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
