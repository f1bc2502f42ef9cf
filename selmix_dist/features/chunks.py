"""One chunk file of a feature cache: a safetensors file of three tensors and its metadata.

    features  float16|float32[stop-start, d]
    labels    int64[stop-start]        (−1 for unlabeled samples)
    indices   int64[stop-start]        positions in the image source
    metadata  key digest, split, split hash, start, stop, sha256 of the three tensors' bytes

Written with a canonical header (byte-identical whatever process writes it) under a temporary name and
renamed; read back as views of a private memory map, checked against the expected metadata and checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from selmix_dist import atomic

_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
_STORED_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def chunk_name(start: int, stop: int) -> str:
    return f"chunk-{start:09d}-{stop:09d}.safetensors"





def tensor_sha256(features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in (features, labels, indices):
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


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


def write_chunk(split_dir: Path, start: int, stop: int, features: torch.Tensor, labels: torch.Tensor,
                 indices: torch.Tensor, meta_base: dict[str, str]) -> None:
    meta = {**meta_base, "start": str(start), "stop": str(stop),
            "sha256": tensor_sha256(features, labels, indices)}
    data = _safetensors_bytes({"features": features, "labels": labels, "indices": indices}, meta)
    atomic.write_bytes(split_dir / chunk_name(start, stop), data)


def map_chunk(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
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


def read_chunk(path: Path, meta_expect: dict[str, str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of one chunk file (views of its memory map) after checking its metadata (and, if `verify`,
    its data checksum, which reads every byte once through the page cache).

    FileNotFoundError / ValueError name the file.
    """
    meta, tensors = map_chunk(path)
    wrong = {k: (meta.get(k), v) for k, v in meta_expect.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"feature chunk {path} belongs to another cache/split: "
                         f"metadata (found, expected) {wrong}")
    if verify and tensor_sha256(tensors["features"], tensors["labels"], tensors["indices"]) != meta.get("sha256"):
        raise ValueError(f"feature chunk {path} is corrupt: its data does not match its sha256")
    return tensors
