"""Write an image source (or a subset of it, e.g. one split list) as webdataset tar shards.

A sample is ``<key>.jpg|png`` + ``<key>.cls`` (the label as ASCII; −1 for unlabeled samples), where the key
is the sample's position in the source, zero-padded, so shards can be traced back to the source. When the
source stores encoded JPEG/PNG bytes those are copied unchanged (no re-encoding loss); otherwise images are
encoded as PNG (lossless) or, on request, JPEG. Shard ``s`` holds samples ``[s·maxcount, (s+1)·maxcount)``
of the written order, and ``dataset.json`` beside the shards records class names, counts and the source,
so ``WebDatasetSource(out_dir)`` reads them back with the right class names. Files are written under a
temporary name and renamed, with a fixed mtime, so equal inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from selmix_dist import atomic
from selmix_dist.data.sources import WDS_META, ImageSource

__all__ = ["shard_count_warning", "write_shards"]

FORMAT = "selmix_dist.wds/1"
_REENCODE = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95})}


def shard_count_warning(num_shards: int, num_samples: int, world_size: int, workers: int) -> str | None:
    """The warning text when there are fewer shards than data-loader workers overall, else None."""
    readers = world_size * workers
    if num_shards >= readers:
        return None
    return (f"{num_shards} shard(s) < world_size × workers = {world_size} × {workers} = {readers}: some "
            f"data-loader workers would get no shard; use maxcount {max(1, num_samples // readers)} or less")


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def write_shards(source: ImageSource, out_dir: str | Path, maxcount: int = 10_000, *,
                 indices: Sequence[int] | torch.Tensor | np.ndarray | None = None,
                 labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
                 world_size: int = 1, workers: int = 1, prefix: str = "shard", reencode: str = "png",
                 overwrite: bool = False) -> list[Path]:
    """Write ``source[indices]`` (default: all of it) with ``labels`` (default: the source's) as shards
    ``out_dir/<prefix>-000000.tar`` … of at most ``maxcount`` samples; return the shard paths.

    indices: int64[N] distinct source positions; labels: int64[N] in [−1, K).
    Warns (``warnings.warn``) when the shard count is below ``world_size × workers``.
    """
    import webdataset as wds

    maxcount = _positive("maxcount", maxcount)
    world_size, workers = _positive("world_size", world_size), _positive("workers", workers)
    if reencode not in _REENCODE:
        raise ValueError(f"reencode must be one of {sorted(_REENCODE)}, got {reencode!r}")
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("no samples to write")
    if idx.min() < 0 or idx.max() >= len(source) or len(np.unique(idx)) != len(idx):
        raise ValueError(f"indices must be distinct positions in [0, {len(source)})")
    lab = source.labels().numpy()[idx] if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(lab) != len(idx):
        raise ValueError(f"labels: {len(lab)} labels for {len(idx)} indices")
    if lab.min() < -1 or lab.max() >= source.num_classes:
        raise ValueError(f"labels must lie in [-1, {source.num_classes})")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob(f"{prefix}-*.tar")) + [p for p in [out_dir / WDS_META] if p.exists()]
    if stale and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards ({stale[0].name}, …); pass --overwrite "
                              "(overwrite=True from Python)")
    for path in stale:
        path.unlink()

    num_shards = math.ceil(len(idx) / maxcount)
    message = shard_count_warning(num_shards, len(idx), world_size, workers)
    if message:
        warnings.warn(message, stacklevel=2)
    width = max(9, len(str(len(source))))
    shards, counts = [], []
    for s in range(num_shards):
        final = out_dir / f"{prefix}-{s:06d}.tar"
        chunk = range(s * maxcount, min((s + 1) * maxcount, len(idx)))
        with atomic.atomic_path(final) as tmp:
            writer = wds.TarWriter(str(tmp), encoder=False, mtime=0.0)
            try:
                for j in chunk:
                    position = int(idx[j])
                    data, ext = _encoded(source, position, reencode)
                    label = str(int(lab[j])).encode()
                    writer.write({"__key__": f"{position:0{width}d}", ext: data, "cls": label})
            finally:
                writer.close()
        shards.append(final)
        counts.append(len(chunk))

    meta = {"format": FORMAT, "class_names": list(source.class_names), "num_samples": len(idx),
            "unlabeled": bool((lab < 0).any()), "source": source.spec(),
            "shards": [{"file": p.name, "count": c} for p, c in zip(shards, counts, strict=True)]}
    atomic.write_text(out_dir / WDS_META, json.dumps(meta, indent=1) + "\n")
    return shards


def _encoded(source: ImageSource, position: int, reencode: str) -> tuple[bytes, str]:
    """The stored bytes when the source has JPEG/PNG files, else the decoded image encoded anew."""
    stored = source.raw(position)
    if stored is not None:
        return stored
    fmt, options = _REENCODE[reencode]
    buffer = io.BytesIO()
    source[position][0].save(buffer, format=fmt, **options)
    return buffer.getvalue(), reencode
