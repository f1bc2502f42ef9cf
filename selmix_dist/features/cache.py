"""Feature cache: frozen-backbone features of each split, extracted once (sharded over ranks), resumable.

Layout of a cache directory:
    manifest.json                          key, chunk size, and per split its hash and chunk list
    <split>/chunk-<start>-<stop>.safetensors   one chunk file (selmix_dist.features.chunks)
    .writer.lock                           held (flock) by the extraction writing the cache: a second is refused

This module owns the manifest and the extraction; `selmix_dist.features.reader` reads a split back.

Positions [0, N) of a split are cut into fixed chunks of `chunk_size`; ranks own contiguous runs of whole
chunks (`shard_bounds` over chunk ids) and batches never cross a chunk boundary, so the chunk files are
byte-identical whatever the number of ranks, and a rerun skips every chunk already written and valid.
Chunks are written to a temporary name and renamed, so a chunk file is either complete or absent.

The cache key is (model name, weights sha256, eval-transform description, storage dtype); a split also
carries the sha256 of its split file (or of its indices and labels). An existing cache with another key
is never overwritten unless `overwrite=True`. The cache directory must be visible to every rank. The
manifest's `backbone` field (`FrozenBackbone.spec()`, not part of the key, absent in caches written before
it existed) says how to rebuild the backbone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from selmix_dist import atomic
from selmix_dist import distributed as dist
from selmix_dist.features.chunks import chunk_name, read_chunk, write_chunk

if TYPE_CHECKING:  # importing timm costs a training rank ~220 MB RSS, and readers never need it
    from selmix_dist.features.backbones import FrozenBackbone

__all__ = [
    "CacheKey",
    "ExtractStats",
    "MANIFEST",
    "extract_features",
    "complete_split",
    "read_manifest",
    "split_content_sha256",
]

MANIFEST = "manifest.json"
WRITER_LOCK = ".writer.lock"
FORMAT = "selmix_dist.feature_cache/1"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CacheKey:
    """What determines the cached features (besides the split itself)."""

    model: str
    weights_sha256: str
    transform: str
    dtype: str

    @classmethod
    def for_backbone(cls, backbone: FrozenBackbone, dtype: str = "float16") -> CacheKey:
        if dtype not in DTYPES:
            raise ValueError(f"feature dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(backbone.name, backbone.weights_sha256, backbone.transform_description(), dtype)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class ExtractStats:
    """Outcome of one `extract_features` call, summed over ranks."""

    split: str
    num_samples: int
    chunks: int
    chunks_written: int
    chunks_skipped: int
    images_extracted: int
    seconds: float
    noop: bool

    @property
    def images_per_second(self) -> float:
        return self.images_extracted / self.seconds if self.seconds > 0 else 0.0


def split_content_sha256(indices: torch.Tensor, labels: torch.Tensor) -> str:
    """Hash of a split given as source positions int64[N] and labels int64[N] (when there is no file)."""
    digest = hashlib.sha256()
    for t in (indices, labels):
        digest.update(np.ascontiguousarray(t.to(torch.int64).numpy()).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no feature cache at {cache_dir}: {path} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"feature-cache manifest {path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    return manifest


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def _key_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    return [f"{k}: cache has {str(found.get(k))[:80]!r}, requested {str(v)[:80]!r}"
            for k, v in expected.items() if found.get(k) != v]


def _mismatch_message(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """"field: cache has X, requested Y; ..." for the fields that differ, the backbone key's fields one by one,
    long values (hashes, the transform description) cut to a window around their first difference."""
    parts = []
    for name, want in expected.items():
        have = found.get(name)
        if have == want or name == "key_digest":  # the digest differs exactly when a key field does
            continue
        if isinstance(want, dict) and isinstance(have, dict):
            parts.append(_mismatch_message(want, have))
        else:
            cached, requested = _around_first_difference(str(have), str(want))
            parts.append(f"{name}: cache has {cached}, requested {requested}")
    return "; ".join(parts) or "key_digest differs"


def _around_first_difference(a: str, b: str, width: int = 48) -> tuple[str, str]:
    """Both values in full (repr) when short, else the same window of each around their first difference."""
    if len(a) <= width and len(b) <= width:
        return repr(a), repr(b)
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, same - width // 2)

    def cut(text: str) -> str:
        return ("…" if start else "") + text[start:start + width] + ("…" if start + width < len(text) else "")

    return cut(a), cut(b)


class _Images(Dataset):
    """Split position -> resized, cropped image uint8[3,H,W] (labels are never read here), or for an image
    that cannot be read, the reason as a string naming the row and the file: a DataLoader worker's exception
    would reach the user as the worker's whole traceback instead."""

    def __init__(self, source: Any, indices: np.ndarray, transform: Any):
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> torch.Tensor | str:
        try:
            image, _ = self.source[int(self.indices[pos])]
        except (ValueError, OSError) as e:  # the sources name the file (and shard) in their errors
            return f"row {pos}: {e}"
        return self.transform(image)


def _collate(items: list[torch.Tensor | str]) -> torch.Tensor | list[str]:
    """A batch of images uint8[B,3,H,W], or the reasons of the images in it that cannot be read."""
    unreadable = [x for x in items if isinstance(x, str)]
    return unreadable or torch.stack(items)


def _chunks_present(split_dir: Path, chunks: list[dict[str, Any]]) -> bool:
    """Every chunk file of a finished split exists with its recorded size (cheap; no checksum)."""
    return all((split_dir / c["file"]).is_file() and (split_dir / c["file"]).stat().st_size == c["bytes"]
               for c in chunks)


def _is_complete(out_dir: Path, split: str, key: CacheKey, split_sha256: str, n: int, chunk_size: int,
                 num_features: int) -> bool:
    """The split is in the cache, complete, under this key and split content, with its chunk files present: a
    read-only check, so that any number of processes may open a finished cache at once (no writer lock)."""
    if not (out_dir / MANIFEST).exists():
        return False
    header = {"format": FORMAT, "key": asdict(key), "key_digest": key.digest(), "chunk_size": chunk_size,
              "num_features": num_features}
    manifest = read_manifest(out_dir)
    old = manifest.get("splits", {}).get(split)
    return bool(old and not _key_differences(header, manifest)
                and not _key_differences({"split_sha256": split_sha256, "num_samples": n}, old)
                and old.get("complete") and _chunks_present(out_dir / split, old["chunks"]))


def _prepare(out_dir: Path, split: str, key: CacheKey, split_sha256: str, n: int, chunk_size: int,
             num_features: int, overwrite: bool, backbone_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Rank 0: check the cache against the key, clear it when `overwrite`, record this split as started.

    The manifest also records `backbone_spec` (`FrozenBackbone.spec()`, how to rebuild the backbone for
    export); it is not part of the key, so caches written before it existed are reused as they are.

    Returns ("done", manifest) when the split is complete and its files are present, else ("run", manifest).
    """
    header = {"format": FORMAT, "key": asdict(key), "key_digest": key.digest(), "chunk_size": chunk_size,
              "num_features": num_features}
    entry_key = {"split_sha256": split_sha256, "num_samples": n}
    path = out_dir / MANIFEST
    manifest = read_manifest(out_dir) if path.exists() else None
    if manifest is None and not overwrite and any((out_dir / split).glob("chunk-*.safetensors")):
        raise ValueError(f"{out_dir / split} holds feature chunks but {path} is missing; "
                         "use another --out, or pass --overwrite to tools/extract_features.py to replace them")
    if manifest is not None:
        diffs = _key_differences(header, manifest)
        old = manifest.get("splits", {}).get(split)
        split_diffs = _key_differences(entry_key, old) if old else []
        if diffs or split_diffs:
            if not overwrite:
                what = "; ".join(([_mismatch_message(header, manifest)] if diffs else [])
                                 + ([f"split {split!r}: {_mismatch_message(entry_key, old)}"] if split_diffs else []))
                raise ValueError(f"feature cache {out_dir} was built with another key ({what}); use another --out, "
                                 "or pass --overwrite to tools/extract_features.py to replace it")
            for name in list(manifest.get("splits", {})) if diffs else [split]:
                shutil.rmtree(out_dir / name, ignore_errors=True)
                manifest["splits"].pop(name, None)
            if diffs:
                manifest = None
        elif _is_complete(out_dir, split, key, split_sha256, n, chunk_size, num_features):
            return "done", manifest
    manifest = manifest or {**header, "splits": {}}
    manifest["backbone"] = backbone_spec
    manifest["splits"][split] = {**entry_key, "complete": False, "chunks": []}
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, manifest)
    return "run", manifest


def extract_features(
    source: Any,
    indices: torch.Tensor | Sequence[int] | None,
    labels: torch.Tensor | Sequence[int] | None,
    backbone: FrozenBackbone,
    out_dir: str | Path,
    split: str,
    *,
    batch_size: int = 256,
    dtype: str = "float16",
    num_workers: int = 2,
    accelerator: Any = None,
    device: str | torch.device | None = None,
    split_sha256: str | None = None,
    chunk_size: int = 2048,
    overwrite: bool = False,
    progress: bool = True,
) -> ExtractStats:
    """Extract `backbone` features of one split into `out_dir/split/` (call on every rank).

    source: ImageSource (`src[i] -> (PIL RGB, label)`, `labels()`); indices: int64[N] positions of the
    split in `source` (None = all of it); labels: int64[N] stored labels (None = `source.labels()[indices]`;
    pass −1s for an unlabeled split); split_sha256: sha256 of the split file (None = hash of indices and
    labels). The backbone is moved to `accelerator.device`, else `device`, else cuda:LOCAL_RANK / cpu.
    Returns stats summed over ranks; a rerun with the same key and split does nothing (noop=True).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and chunk_size ({chunk_size}) must be >= 1")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}")
    t0 = time.perf_counter()
    if indices is None:
        idx = torch.arange(len(source))
    else:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    if idx.ndim != 1:
        raise ValueError(f"split {split!r}: indices must be 1-D, got shape {tuple(idx.shape)}")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(source)):
        raise ValueError(f"split {split!r}: indices outside [0, {len(source)}) of the source")
    if labels is None:
        lab = torch.as_tensor(np.asarray(source.labels()), dtype=torch.int64)[idx]
    else:
        lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if lab.shape != idx.shape:
        raise ValueError(f"split {split!r}: {len(lab)} labels for {len(idx)} indices")
    key = CacheKey.for_backbone(backbone, dtype)
    split_sha256 = split_sha256 or split_content_sha256(idx, lab)
    out_dir = Path(out_dir)
    n = len(idx)
    rank, world = dist.world_info()

    # Rank 0 decides; every rank learns the decision (or the error) so that none is left waiting.
    decision: tuple[str, Any]
    lock = None
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not overwrite and _is_complete(out_dir, split, key, split_sha256, n, chunk_size,
                                              backbone.num_features):
                decision = ("done", None)
            else:
                lock = _lock_writer(out_dir)
                decision = _prepare(out_dir, split, key, split_sha256, n, chunk_size, backbone.num_features,
                                    overwrite, backbone.spec())
        except (ValueError, FileNotFoundError, OSError) as e:
            decision = ("error", e)
    else:
        decision = ("", None)
    try:
        status, payload = dist.broadcast_object(decision)
        if status == "error":
            raise payload
        if status == "done":
            num_chunks = -(-n // chunk_size)
            return ExtractStats(split, n, num_chunks, 0, num_chunks, 0, time.perf_counter() - t0, True)
        return _extract(source, idx, lab, backbone, out_dir, split, key, split_sha256, batch_size, dtype,
                        num_workers, accelerator, device, chunk_size, progress, t0)
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock (the file stays: removing it would race with a new writer)


def _lock_writer(out_dir: Path) -> int:
    """Rank 0's exclusive hold on `out_dir` while one extraction writes it: a second extraction into the same
    directory (which would interleave its manifest updates with this one's) is refused, naming the holder.
    Returns the descriptor that holds the lock (`flock`, released when it is closed or the process dies)."""
    path = out_dir / WRITER_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        # The file stays empty (no pid): a cache's files are the same whatever process wrote them.
        raise ValueError(f"feature cache {out_dir} is being written by another extraction (it holds {path}; "
                         f"`fuser {path}` names it); wait for it to finish, or extract into another --out") from None
    return fd


def _extract(source: Any, idx: torch.Tensor, lab: torch.Tensor, backbone: FrozenBackbone, out_dir: Path,
             split: str, key: CacheKey, split_sha256: str, batch_size: int, dtype: str, num_workers: int,
             accelerator: Any, device: str | torch.device | None, chunk_size: int, progress: bool,
             t0: float) -> ExtractStats:
    """The chunks of `split` this rank owns that are not yet on disk and valid, then (rank 0) the sealed
    manifest entry; `extract_features` has prepared the manifest and holds the writer lock."""
    n = len(idx)
    rank, world = dist.world_info()
    num_chunks = -(-n // chunk_size)

    meta_base = {"key_digest": key.digest(), "split": split, "split_sha256": split_sha256}
    c0, c1 = dist.shard_bounds(num_chunks, rank, world)
    pending: list[tuple[int, int]] = []
    skipped = 0
    for c in range(c0, c1):
        start, stop = c * chunk_size, min((c + 1) * chunk_size, n)
        path = out_dir / split / chunk_name(start, stop)
        try:
            read_chunk(path, {**meta_base, "start": str(start), "stop": str(stop)})
            skipped += 1
        except (ValueError, FileNotFoundError):
            pending.append((start, stop))  # absent or damaged: (re)compute it

    device = torch.device(accelerator.device if accelerator is not None else device or (
        f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu"))
    backbone.to(device)
    # Batches start at chunk starts, so batch composition (hence every float) is independent of world size.
    batches = [list(range(b, min(b + batch_size, stop))) for start, stop in pending
               for b in range(start, stop, batch_size)]
    images_u8 = _Images(source, idx.numpy(), backbone.transform(train=False, normalize=False))
    loader = DataLoader(images_u8, batch_sampler=batches, num_workers=num_workers if batches else 0,
                        pin_memory=device.type == "cuda", collate_fn=_collate)
    store = DTYPES[dtype]
    bar = tqdm(total=sum(b - a for a, b in pending), desc=f"features {split}", unit="img",
               disable=not progress or rank != 0)
    chunk_iter = iter(pending)
    start, stop = next(chunk_iter, (0, 0))
    buf = torch.empty(stop - start, backbone.num_features, dtype=store)
    filled = 0
    for images in loader:
        if isinstance(images, list):
            # Skipping would leave the cache without rows its split list names: refuse, keeping the chunks done.
            raise ValueError(f"split {split!r}: {len(images)} image(s) of chunk [{start}, {stop}) cannot be read "
                             f"({'; '.join(images)}); replace the file(s), or remove them from the source and remake "
                             "the split (tools/make_lt_split.py)")
        feats = backbone(backbone.normalize(images.to(device, non_blocking=True))).to(store).cpu()
        if not bool(torch.isfinite(feats).all()):
            raise ValueError(f"split {split!r}: non-finite features in chunk [{start}, {stop}) "
                             f"(overflow in {dtype}? try dtype='float32')")
        buf[filled:filled + len(feats)] = feats
        filled += len(feats)
        bar.update(len(feats))
        if filled == stop - start:
            write_chunk(out_dir / split, start, stop, buf, lab[start:stop], idx[start:stop], meta_base)
            start, stop = next(chunk_iter, (0, 0))
            buf = torch.empty(stop - start, backbone.num_features, dtype=store)
            filled = 0
    bar.close()

    counts = dist.all_reduce_sum(torch.tensor([len(pending), skipped, sum(b - a for a, b in pending)]))
    dist.barrier()  # every chunk is on disk before rank 0 seals the manifest
    if rank == 0:
        chunks = []
        for c in range(num_chunks):
            a, b = c * chunk_size, min((c + 1) * chunk_size, n)
            path = out_dir / split / chunk_name(a, b)
            with safe_open(str(path), framework="pt") as f:
                digest = (f.metadata() or {})["sha256"]
            chunks.append({"file": path.name, "start": a, "stop": b, "sha256": digest,
                           "bytes": path.stat().st_size})
        manifest = read_manifest(out_dir)
        manifest["splits"][split].update(complete=True, chunks=chunks)
        _write_json_atomic(out_dir / MANIFEST, manifest)
    dist.barrier()
    written, kept, images = (int(v) for v in counts)
    return ExtractStats(split, n, num_chunks, written, kept, images, time.perf_counter() - t0, False)


def complete_split(cache_dir: Path, split: str, key: CacheKey | None,
                    split_sha256: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and the entry of a complete `split`, checked against `key` / `split_sha256` if given."""
    manifest = read_manifest(cache_dir)
    if key is not None:
        diffs = _key_differences(asdict(key), manifest["key"])
        if diffs:
            raise ValueError(f"feature cache {cache_dir} does not match the requested key: "
                             f"{'; '.join(diffs)}")
    entry = manifest["splits"].get(split)
    if entry is None:
        raise ValueError(f"feature cache {cache_dir} has no split {split!r} "
                         f"(it has {sorted(manifest['splits'])})")
    if not entry["complete"]:
        raise ValueError(f"split {split!r} in feature cache {cache_dir} is incomplete; rerun the extraction")
    if split_sha256 is not None and entry["split_sha256"] != split_sha256:
        raise ValueError(f"split {split!r} in feature cache {cache_dir} was extracted from another "
                         f"split file (sha256 {entry['split_sha256'][:12]}…, requested {split_sha256[:12]}…)")
    return manifest, entry
