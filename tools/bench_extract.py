"""Feature-extraction throughput: `extract_features` against a bare `backbone(x)` loop on the same batches.

    python tools/bench_extract.py --num-images 256 --image-size 224 [--json]

Rows:
  bare model(x)       forward only, on batches transformed and moved to the device beforehand
  extract_features    the library path: source -> transform -> DataLoader -> backbone -> float16 chunk files
  ratio               extractor / bare images per second (goal >= 0.90)
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

from selmix_dist.data.backbones import build_backbone
from selmix_dist.data.features import extract_features
from selmix_dist.data.sources import SOURCE_KINDS, ArraySource, open_source

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
    p.add_argument("--full", action="store_true", help="really extract a CIFAR-10-LT-sized synthetic set")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def synthetic_source(n: int, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batches(backbone, source, n: int, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The extractor's batches of positions [0, n), transformed, normalised and moved to the device."""
    tf = backbone.transform(train=False)
    return [torch.stack([tf(source[i][0]) for i in range(a, min(a + batch_size, n))]).to(device)
            for a in range(0, n, batch_size)]


def bare_rate(backbone, batches: list[torch.Tensor], device: torch.device) -> float:
    """Images/s of backbone(x) alone over ready batches."""
    n = sum(len(x) for x in batches)
    backbone(batches[0])  # warm-up (kernel selection, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for x in batches:
        backbone(x).cpu()
    _sync(device)
    return n / (time.perf_counter() - t0)


def extractor_rate(backbone, source, n: int, args: argparse.Namespace,
                   device: torch.device) -> tuple[float, float]:
    """(images/s, seconds) of extract_features over positions [0, n) into a throw-away cache."""
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers, device=device,
                  progress=False)
        warm = torch.arange(min(args.batch_size, n))
        extract_features(source, warm, None, backbone, f"{tmp}/warm", "warm", **kw)
        t0 = time.perf_counter()
        extract_features(source, torch.arange(n), None, backbone, f"{tmp}/run", "bench", **kw)
        seconds = time.perf_counter() - t0
    return n / seconds, seconds


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = args.weights or ("lite" if args.model.startswith("tf_efficientnet_lite") else "none")
    backbone = build_backbone(args.model, weights, image_size=args.image_size).to(device)
    side = backbone.data_config["input_size"][-1]
    if args.source is not None:
        source = open_source(args.source_kind, args.source)
    else:
        source = synthetic_source(sum(CIFAR10_LT.values()) if args.full else args.num_images)
    n = min(args.num_images, len(source))

    batches = device_batches(backbone, source, n, args.batch_size, device)
    bare_runs, extract_runs = [], []
    for _ in range(args.repeats):
        bare_runs.append(bare_rate(backbone, batches, device))
        extract_runs.append(extractor_rate(backbone, source, n, args, device)[0])
    bare, rate = max(bare_runs), max(extract_runs)
    total = sum(CIFAR10_LT.values())
    if args.full:
        full_rate, full_seconds = extractor_rate(backbone, source, total, args, device)
        cifar = {"seconds": full_seconds, "estimated": False, "images_per_s": full_rate}
    else:
        cifar = {"seconds": total / rate, "estimated": True, "images_per_s": rate}
    result = {
        "model": args.model, "weights": weights, "image_size": side, "device": str(device),
        "threads": torch.get_num_threads(), "num_images": n, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "dtype": args.dtype, "repeats": args.repeats,
        "bare_runs": bare_runs, "extract_runs": extract_runs,
        "synthetic": args.source is None,
        "bare_images_per_s": bare, "extract_images_per_s": rate, "ratio": rate / bare,
        "cifar10_lt_images": total, "cifar10_lt_seconds": cifar["seconds"],
        "cifar10_lt_estimated": cifar["estimated"],
    }
    if args.json:
        print(json.dumps(result))
        return
    kind = "synthetic" if args.source is None else args.source_kind
    print(f"{args.model} ({weights}) at {side}px on {device} ({result['threads']} threads), "
          f"batch {args.batch_size}, {args.num_workers} workers, {n} {kind} images, {args.dtype} cache")
    print(f"{'measure (best of ' + str(args.repeats) + ')':<26} {'value':>12}")
    print(f"{'bare model(x) img/s':<26} {bare:>12.1f}")
    print(f"{'extract_features img/s':<26} {rate:>12.1f}")
    print(f"{'ratio (goal >= 0.90)':<26} {rate / bare:>12.3f}")
    label = "CIFAR-10-LT s (est.)" if cifar["estimated"] else "CIFAR-10-LT s"
    print(f"{label:<26} {cifar['seconds']:>12.1f}   ({total} images)")


if __name__ == "__main__":
    main()
