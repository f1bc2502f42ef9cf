"""Feature cache: frozen-backbone features of each split, extracted once (sharded over ranks), resumable.

Layout of a cache directory:
    manifest.json                          key, chunk size, and per split its hash and chunk list
    <split>/chunk-<start>-<stop>.safetensors
        features  float16|float32[stop-start, d]
        labels    int64[stop-start]        (−1 for unlabeled samples)
        indices   int64[stop-start]        positions in the image source
        metadata  key digest, split hash, start, stop, sha256 of the three tensors' bytes

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

import hashlib
import json
import math
import os
import shutil
import time
import weakref
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

if TYPE_CHECKING:  # importing timm costs a training rank ~220 MB RSS, and readers never need it
    from selmix_dist.features.backbones import FrozenBackbone

__all__ = [
    "CacheKey",
    "CachedFeatures",
    "ExtractStats",
    "FeatureSplit",
    "MANIFEST",
    "extract_features",
    "load_features",
    "open_features",
    "read_manifest",
    "split_content_sha256",
]

MANIFEST = "manifest.json"
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
class FeatureSplit:
    """features float32[N,d], labels int64[N] (−1 = unlabeled), indices int64[N] (source positions)."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


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


def _chunk_name(start: int, stop: int) -> str:
    return f"chunk-{start:09d}-{stop:09d}.safetensors"


def _tensor_sha256(features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in (features, labels, indices):
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def _map_chunk(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and the three tensors of a chunk file, as views of a memory map of the file (no copy).

    The map is private (MAP_PRIVATE): its pages are the page cache's, shared by every process that maps
    the file, and a write to a view would copy the page instead of reaching the file. The file closes at
    once; the map lives as long as a view does. FileNotFoundError / ValueError name the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or not 0 < length <= size - 8:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length))
        meta = header.pop("__metadata__", None) or {}
        base = 8 + length
        layout = {}
        for name in ("features", "labels", "indices"):
            spec = header[name]
            dtype = _STORED_DTYPES[spec["dtype"]]
            shape, (begin, end) = tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
            # safetensors pads the header to 8 bytes, so an aligned tensor can be viewed where it lies.
            if (end - begin != math.prod(shape) * dtype.itemsize or base + end > size
                    or (base + begin) % dtype.itemsize):
                raise ValueError(f"tensor {name!r} of shape {shape} does not fit bytes [{begin}, {end})")
            layout[name] = (dtype, shape, base + begin)
    except FileNotFoundError:
        raise FileNotFoundError(f"feature chunk {path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
        raise ValueError(f"feature chunk {path} is unreadable (corrupt or truncated): {e!r}") from e
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    tensors = {}
    for name, (dtype, shape, offset) in layout.items():
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
    return meta, tensors


def _read_chunk(path: Path, meta_expect: dict[str, str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of one chunk file (views of its memory map) after checking its metadata (and, if `verify`,
    its data checksum, which reads every byte once through the page cache).

    FileNotFoundError / ValueError name the file.
    """
    meta, tensors = _map_chunk(path)
    wrong = {k: (meta.get(k), v) for k, v in meta_expect.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"feature chunk {path} belongs to another cache/split: "
                         f"metadata (found, expected) {wrong}")
    if verify and _tensor_sha256(tensors["features"], tensors["labels"], tensors["indices"]) != meta.get("sha256"):
        raise ValueError(f"feature chunk {path} is corrupt: its data does not match its sha256")
    return tensors


class _Images(Dataset):
    """Split position -> resized, cropped image uint8[3,H,W] (labels are never read here)."""

    def __init__(self, source: Any, indices: np.ndarray, transform: Any):
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> torch.Tensor:
        image, _ = self.source[int(self.indices[pos])]
        return self.transform(image)


def _chunks_present(split_dir: Path, chunks: list[dict[str, Any]]) -> bool:
    """Every chunk file of a finished split exists with its recorded size (cheap; no checksum)."""
    return all((split_dir / c["file"]).is_file() and (split_dir / c["file"]).stat().st_size == c["bytes"]
               for c in chunks)


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
        elif old and old.get("complete") and _chunks_present(out_dir / split, old["chunks"]):
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
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            decision = _prepare(out_dir, split, key, split_sha256, n, chunk_size, backbone.num_features,
                                overwrite, backbone.spec())
        except (ValueError, FileNotFoundError, OSError) as e:
            decision = ("error", e)
    else:
        decision = ("", None)
    status, payload = dist.broadcast_object(decision)
    if status == "error":
        raise payload
    num_chunks = -(-n // chunk_size)
    if status == "done":
        return ExtractStats(split, n, num_chunks, 0, num_chunks, 0, time.perf_counter() - t0, True)

    meta_base = {"key_digest": key.digest(), "split": split, "split_sha256": split_sha256}
    c0, c1 = dist.shard_bounds(num_chunks, rank, world)
    pending: list[tuple[int, int]] = []
    skipped = 0
    for c in range(c0, c1):
        start, stop = c * chunk_size, min((c + 1) * chunk_size, n)
        path = out_dir / split / _chunk_name(start, stop)
        try:
            _read_chunk(path, {**meta_base, "start": str(start), "stop": str(stop)})
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
                        pin_memory=device.type == "cuda")
    store = DTYPES[dtype]
    bar = tqdm(total=sum(b - a for a, b in pending), desc=f"features {split}", unit="img",
               disable=not progress or rank != 0)
    chunk_iter = iter(pending)
    start, stop = next(chunk_iter, (0, 0))
    buf = torch.empty(stop - start, backbone.num_features, dtype=store)
    filled = 0
    for images in loader:
        feats = backbone(backbone.normalize(images.to(device, non_blocking=True))).to(store).cpu()
        if not bool(torch.isfinite(feats).all()):
            raise ValueError(f"split {split!r}: non-finite features in chunk [{start}, {stop}) "
                             f"(overflow in {dtype}? try dtype='float32')")
        buf[filled:filled + len(feats)] = feats
        filled += len(feats)
        bar.update(len(feats))
        if filled == stop - start:
            _write_chunk(out_dir / split, start, stop, buf, lab[start:stop], idx[start:stop], meta_base)
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
            path = out_dir / split / _chunk_name(a, b)
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


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
_STORED_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a canonical header (sorted keys, no spaces).

    safetensors' own writer orders `__metadata__` by a hash map, so two processes writing the same chunk
    would produce different bytes; this writer makes chunk files byte-identical across runs and ranks.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to an 8-byte boundary with spaces
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def _write_chunk(split_dir: Path, start: int, stop: int, features: torch.Tensor, labels: torch.Tensor,
                 indices: torch.Tensor, meta_base: dict[str, str]) -> None:
    meta = {**meta_base, "start": str(start), "stop": str(stop),
            "sha256": _tensor_sha256(features, labels, indices)}
    data = _safetensors_bytes({"features": features, "labels": labels, "indices": indices}, meta)
    atomic.write_bytes(split_dir / _chunk_name(start, stop), data)


def _complete_split(cache_dir: Path, split: str, key: CacheKey | None,
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


# IEEE exponent bits: a float is inf or NaN exactly when they are all set.
_EXPONENT_MASK = {torch.float16: (np.uint16, 0x7C00), torch.float32: (np.uint32, 0x7F800000)}


def _first_nonfinite_row(features: torch.Tensor) -> int | None:
    """Index of the first row of `features` [n, d] (float16/float32) holding an inf or NaN, else None.

    Tests the exponent bits of the stored integers (10x faster than isfinite on float16).
    """
    bits, mask = _EXPONENT_MASK[features.dtype]
    bad = ((features.numpy().view(bits) & mask) == mask).any(axis=1)
    return int(bad.argmax()) if bad.any() else None


class CachedFeatures:
    """One split of a feature cache, read from the chunk files on demand by positional reads (`pread`).

    Features stay in the page cache as stored (float16 or float32): the ranks of a node share that one
    copy, and a process holds only the batches it reads. Reads rather than a memory map, because mapped
    pages a process has touched count in its RSS (and in its PSS share) until the map goes, so that a rank
    drawing partners from the whole pool would look as large as the pool. `take(index)` converts to
    float32 per batch. labels int64[N] (−1 = unlabeled) and indices int64[N] (source positions) are small
    and held in memory.
    """

    def __init__(self, files: list[tuple[Path, int]], starts: list[int], labels: torch.Tensor,
                 indices: torch.Tensor, num_features: int, dtype: torch.dtype, name: str):
        """files: per chunk (path, byte offset of its features); starts: each chunk's first row."""
        self.labels, self.indices = labels, indices
        self.num_features, self.dtype, self.name = num_features, dtype, name
        self._paths = [path for path, _ in files]
        self._offsets = np.asarray([offset for _, offset in files], dtype=np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._row_bytes = num_features * self._np_dtype.itemsize
        self._fds = [os.open(path, os.O_RDONLY) for path in self._paths]
        weakref.finalize(self, _close_all, list(self._fds))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (int64[B], any order, repeats allowed) as float32[B, d]."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"split {self.name!r}: take needs a 1-D integer index, got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        rows = index.cpu().numpy().astype(np.int64, copy=False)
        if not len(rows):
            return torch.empty(0, self.num_features)
        if rows.min() < 0 or rows.max() >= len(self):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise IndexError(f"split {self.name!r}: row {bad} is outside [0, {len(self)})")
        unique, inverse = np.unique(rows, return_inverse=True)
        stored = np.empty((len(unique), self.num_features), dtype=self._np_dtype)
        chunk = np.searchsorted(self._starts, unique, side="right") - 1
        # One read per run of consecutive rows inside a chunk: a pass over a split is a few large reads, a
        # random batch one small read per row.
        cuts = np.flatnonzero((np.diff(unique) != 1) | (np.diff(chunk) != 0)) + 1
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(unique)].tolist(), strict=True):
            c = chunk[a]
            offset = int(self._offsets[c] + (unique[a] - self._starts[c]) * self._row_bytes)
            self._read_into(c, memoryview(stored[a:b]).cast("B"), offset)
        # One conversion of the whole batch: torch's is vectorised, numpy's float16 cast is 3x slower.
        out = torch.from_numpy(stored).to(torch.float32)
        return out if len(unique) == len(rows) and bool((unique == rows).all()) else out[torch.from_numpy(inverse)]

    def _read_into(self, chunk: int, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):   # a regular file may still return short reads (signals, > 2 GB)
            n = os.preadv(self._fds[chunk], [buffer[done:]], offset + done)
            if n == 0:
                raise ValueError(f"feature chunk {self._paths[chunk]} ended early (truncated after it was "
                                 "opened?)")
            done += n


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def open_features(cache_dir: str | Path, split: str, *, key: CacheKey | None = None,
                  split_sha256: str | None = None, verify: bool = True) -> CachedFeatures:
    """The cached split as a `CachedFeatures` reader (no copy of the features; rows are read on demand).

    key / split_sha256: when given, the cache must have been built with exactly these (ValueError
    listing the differing fields otherwise). Every chunk is scanned once, through a map that is dropped
    afterwards: its sha256 when `verify` (1.8 GB/s per core, i.e. about 3 s for 5 GB of float16 once the
    files are in the page cache), and always its rows for inf / NaN (ValueError naming the split, the row
    and the chunk file). A missing chunk raises FileNotFoundError, a corrupt one ValueError, naming the file.
    """
    cache_dir = Path(cache_dir)
    manifest, entry = _complete_split(cache_dir, split, key, split_sha256)
    n, d = entry["num_samples"], manifest["num_features"]
    labels = torch.empty(n, dtype=torch.int64)
    indices = torch.empty(n, dtype=torch.int64)
    meta_base = {"key_digest": manifest["key_digest"], "split": split, "split_sha256": entry["split_sha256"]}
    files, starts, covered, dtype = [], [], 0, torch.float32
    for c in entry["chunks"]:
        path = cache_dir / split / c["file"]
        a, b = c["start"], c["stop"]
        if a != covered or not a < b <= n:
            raise ValueError(f"feature cache {cache_dir}: the chunks of split {split!r} do not tile [0, {n}) "
                             f"(chunk {c['file']})")
        expect = {**meta_base, "start": str(a), "stop": str(b), "sha256": c["sha256"]}
        scanned = _read_chunk(path, expect, verify)
        found = {name: (str(t.dtype), tuple(t.shape)) for name, t in scanned.items()}
        wanted = {"features": (str(scanned["features"].dtype), (b - a, d)), "labels": ("torch.int64", (b - a,)),
                  "indices": ("torch.int64", (b - a,))}
        if found != wanted or scanned["features"].dtype not in _EXPONENT_MASK:
            raise ValueError(f"feature chunk {path} holds {found}, expected {wanted} with float16/float32 features")
        bad = _first_nonfinite_row(scanned["features"])
        if bad is not None:
            raise ValueError(f"split {split!r} of feature cache {cache_dir}: row {a + bad} has non-finite "
                             f"features (chunk {path})")
        labels[a:b], indices[a:b] = scanned["labels"], scanned["indices"]
        features = scanned["features"]  # a view of the file's map: where it starts is where rows are read
        dtype, offset = features.dtype, features.storage_offset() * features.element_size()
        # Unmap the scanned pages (they stay in the page cache, not in this process); rows are read later.
        del scanned, features
        files.append((path, offset))
        starts.append(a)
        covered = b
    if covered != n:
        raise ValueError(f"feature cache {cache_dir}: the chunks of split {split!r} do not tile [0, {n})")
    return CachedFeatures(files, starts, labels, indices, d, dtype, split)


def load_features(cache_dir: str | Path, split: str, *, key: CacheKey | None = None,
                  split_sha256: str | None = None, verify: bool = True) -> FeatureSplit:
    """The cached split copied into memory: float32 features [N,d] (upcast from float16), labels, indices.

    A private O(N·d) copy per process, for small splits and tests; training opens the cache with
    `open_features` instead (rows read on demand, one page-cache copy per node). Arguments and errors as there.
    """
    reader = open_features(cache_dir, split, key=key, split_sha256=split_sha256, verify=verify)
    return FeatureSplit(reader.take(torch.arange(len(reader))), reader.labels, reader.indices)
