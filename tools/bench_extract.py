"""Feature-extraction throughput: `extract_features` against a bare `backbone(x)` loop on the same batches.

    python tools/bench_extract.py --num-images 256 --image-size 224 [--json]
    python tools/bench_extract.py --device cuda --autocast bf16 --channels-last --num-workers 8 --json

Rows:
  bare model(x)       forward only, on batches transformed and moved to the device beforehand
  extract_features    the library path: source -> transform -> DataLoader -> backbone -> float16 chunk files
  ratio               extractor / bare images per second (goal >= 0.90)
  --autocast bf16 and --channels-last apply to both measurements alike (the ratio compares like with like)
  CIFAR-10-LT         3720 labeled + 7443 unlabeled + 10000 val + 10000 test images at the extractor's
                      measured rate (an estimate unless --full extracts that many synthetic images)

Images are synthetic 32x32 RGB (CIFAR-sized, upsampled by the transform like CIFAR would be) unless
--source-kind/--source name a real image source, whose first --num-images items are used.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from selmix_dist.data.sources import SOURCE_KINDS, ArraySource, open_source
from selmix_dist.features.backbones import build_backbone
from selmix_dist.features.cache import extract_features

CIFAR10_LT = {"labeled": 3720, "unlabeled": 7443, "val": 10000, "test": 10000}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default=None,
                   help="none | timm | lite | path (default: lite for Lite models, else none)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--source-kind", choices=sorted(SOURCE_KINDS), default=None)
    p.add_argument("--source", default=None, help="real image source (default: synthetic images)")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate the two measurements this often and keep each one's best (shared CPUs)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="run the backbone under torch.autocast(bfloat16) (both measurements)")
    p.add_argument("--channels-last", action="store_true",
                   help="convert the model's weights to channels-last (inputs always are: FrozenBackbone.forward)")
    p.add_argument("--full", action="store_true", help="really extract a CIFAR-10-LT-sized synthetic set")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def synthetic_source(n: int, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall seconds and this process's CPU seconds (all its threads) of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def device_batches(backbone, source, n: int, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The extractor's batches of positions [0, n), transformed, normalised and moved to the device."""
    tf = backbone.transform(train=False)
    return [torch.stack([tf(source[i][0]) for i in range(a, min(a + batch_size, n))]).to(device)
            for a in range(0, n, batch_size)]


def time_bare(backbone, batches: list[torch.Tensor], device: torch.device) -> Clock:
    """backbone(x) alone over ready batches."""
    backbone(batches[0])  # warm-up (kernel selection, allocator)
    _sync(device)
    with Clock() as clock:
        for x in batches:
            backbone(x).cpu()
        _sync(device)
    return clock


def time_extract(backbone, source, n: int, args: argparse.Namespace, device: torch.device) -> Clock:
    """extract_features over positions [0, n) into a throw-away cache (after a one-batch warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers, device=device,
                  progress=False)
        extract_features(source, torch.arange(min(args.batch_size, n)), None, backbone, f"{tmp}/w", "w", **kw)
        with Clock() as clock:
            extract_features(source, torch.arange(n), None, backbone, f"{tmp}/run", "bench", **kw)
    return clock


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = args.weights or ("lite" if args.model.startswith("tf_efficientnet_lite") else "none")
    backbone = build_backbone(args.model, weights, image_size=args.image_size).to(device)
    if args.channels_last:
        backbone.model.to(memory_format=torch.channels_last)  # 4-D (conv) weights only; others are unchanged
    side = backbone.data_config["input_size"][-1]
    total = sum(CIFAR10_LT.values())
    if args.source is not None:
        source = open_source(args.source_kind, args.source)
    else:
        source = synthetic_source(total if args.full else args.num_images)
    n = min(args.num_images, len(source))

    batches = device_batches(backbone, source, n, args.batch_size, device)
    bare, extract = [], []
    # autocast is thread-local and extract_features runs the backbone in this thread (workers only decode)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
        for _ in range(args.repeats):  # alternate, so that a burst of load from elsewhere hits both
            bare.append(time_bare(backbone, batches, device))
            extract.append(time_extract(backbone, source, n, args, device))
    bare_wall = n / min(c.wall for c in bare)
    extract_wall = n / min(c.wall for c in extract)
    # CPU time is robust to other users of a shared CPU but misses DataLoader worker processes.
    cpu_comparable = device.type == "cpu" and args.num_workers == 0
    bare_cpu = n / min(c.cpu for c in bare) if cpu_comparable else None
    extract_cpu = n / min(c.cpu for c in extract) if cpu_comparable else None
    if args.full:
        seconds, estimated = time_extract(backbone, source, total, args, device).wall, False
    else:
        seconds, estimated = total / extract_wall, True
    result = {
        "model": args.model, "weights": weights, "image_size": side, "device": str(device),
        "threads": torch.get_num_threads(), "num_images": n, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "dtype": args.dtype, "repeats": args.repeats,
        "autocast": args.autocast, "channels_last": args.channels_last,
        "synthetic": args.source is None,
        "bare_images_per_s": bare_wall, "extract_images_per_s": extract_wall,
        "ratio": extract_wall / bare_wall,
        "bare_images_per_cpu_s": bare_cpu, "extract_images_per_cpu_s": extract_cpu,
        "ratio_cpu": extract_cpu / bare_cpu if cpu_comparable else None,
        "wall_runs_s": {"bare": [c.wall for c in bare], "extract": [c.wall for c in extract]},
        "cifar10_lt_images": total, "cifar10_lt_seconds": seconds, "cifar10_lt_estimated": estimated,
    }
    if args.json:
        print(json.dumps(result))
        return
    kind = "synthetic" if args.source is None else args.source_kind
    print(f"{args.model} ({weights}) at {side}px on {device} ({result['threads']} threads), "
          f"batch {args.batch_size}, {args.num_workers} workers, {n} {kind} images, {args.dtype} cache, "
          f"autocast {args.autocast}{', channels-last weights' if args.channels_last else ''}, best of {args.repeats}")
    print(f"{'measure':<24} {'wall':>10} {'cpu-time':>10}")

    def row(name: str, wall: float, cpu: float | None, fmt: str = ".1f") -> None:
        print(f"{name:<24} {wall:>10{fmt}} {'-' if cpu is None else format(cpu, fmt):>10}")

    row("bare model(x) img/s", bare_wall, bare_cpu)
    row("extract_features img/s", extract_wall, extract_cpu)
    row("ratio (goal >= 0.90)", result["ratio"], result["ratio_cpu"], ".3f")
    label = "CIFAR-10-LT s (est.)" if estimated else "CIFAR-10-LT s"
    print(f"{label:<24} {seconds:>10.1f}   ({total} images at {side}px)")


if __name__ == "__main__":
    main()
