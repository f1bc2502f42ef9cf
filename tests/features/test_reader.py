"""The cache reader (`open_features` / `CachedFeatures`, positional reads) and the FeatureSet views over it.

Reference values come from an independent reader (safetensors' own `load_file` of every chunk file) and
from the table the cache was written from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.feature_cache import write_feature_cache
from safetensors.torch import load_file

from selmix_dist.features.reader import load_features, open_features
from selmix_dist.features.sets import FeatureSet
from selmix_dist.memory import map_large_blocks, release_freed_memory

N, D, CHUNK = 1000, 24, 64  # 16 chunks, the last one short (40 rows)


def _table(seed: int = 0, n: int = N, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 30


def _labels(n: int = N) -> torch.Tensor:
    return torch.arange(n) % 7


def _write(tmp_path, dtype="float16", split="train", table=None, labels=None, chunk_size=CHUNK):
    table = _table() if table is None else table
    labels = _labels(len(table)) if labels is None else labels
    write_feature_cache(tmp_path, split, labels, lambda pos: table[pos], table.shape[1], dtype=dtype,
                        chunk_size=chunk_size)
    return table


def _chunk_files(root, split="train"):
    return sorted((root / split).glob("chunk-*.safetensors"))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_are_the_stored_rows_as_float32(tmp_path, dtype):
    table = _write(tmp_path, dtype)
    reader = open_features(tmp_path, "train")
    stored = torch.cat([load_file(str(f))["features"] for f in _chunk_files(tmp_path)])
    assert reader.dtype == stored.dtype == getattr(torch, dtype) and len(reader) == N and reader.num_features == D
    # any order, repeats, rows from several chunks and from the short last one
    index = torch.cat([torch.randint(0, N, (300,), generator=torch.Generator().manual_seed(1)),
                       torch.tensor([999, 0, 999, 63, 64, 960])])
    rows = reader.take(index)
    assert rows.dtype == torch.float32 and rows.shape == (len(index), D)
    assert torch.equal(rows, stored[index].float())
    assert torch.equal(rows, table[index].to(getattr(torch, dtype)).float())
    assert torch.equal(reader.labels, _labels()) and torch.equal(reader.indices, torch.arange(N))
    assert torch.equal(load_features(tmp_path, "train").features, stored.float())
    assert reader.take(torch.tensor([], dtype=torch.int64)).shape == (0, D)


def test_bad_take_index_is_named(tmp_path):
    _write(tmp_path)
    reader = open_features(tmp_path, "train")
    with pytest.raises(IndexError, match=r"split 'train': row 1000 is outside \[0, 1000\)"):
        reader.take(torch.tensor([3, 1000]))
    with pytest.raises(IndexError, match="row -1"):
        reader.take(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D integer index"):
        reader.take(torch.zeros(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D integer index"):
        reader.take(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("dtype, bad_bits", [("float16", 0x7E00), ("float16", 0xFC00),  # NaN, −inf
                                             ("float32", 0x7F800000), ("float32", 0x7FC00000)])  # inf, NaN
def test_non_finite_row_is_refused_naming_split_and_row(tmp_path, dtype, bad_bits):
    _write(tmp_path, dtype, split="unlabeled", labels=torch.full((N,), -1))
    # Row 300 = row 44 of chunk 4, element 5: overwrite it in place, behind the writer's back.
    path = _chunk_files(tmp_path, "unlabeled")[4]
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    begin = json.loads(raw[8:header])["features"]["data_offsets"][0]
    item = 2 if dtype == "float16" else 4
    at = header + begin + (44 * D + 5) * item
    raw[at:at + item] = bad_bits.to_bytes(item, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"split 'unlabeled' .*row 300 has non-finite features.*chunk-000000256"):
        open_features(tmp_path, "unlabeled", verify=False)
    with pytest.raises(ValueError, match=f"{path.name} is corrupt"):  # and the checksum sees the change too
        open_features(tmp_path, "unlabeled")


def test_manifest_whose_chunks_do_not_tile_the_split(tmp_path):
    _write(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["splits"]["train"]["chunks"][3]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"chunks of split 'train' do not tile \[0, 1000\).*chunk-000000256"):
        open_features(tmp_path, "train")


def _memory_kib() -> dict[str, int]:
    status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith(("RssAnon:", "RssFile:"))}
    return status


def test_reader_holds_neither_a_copy_nor_mapped_pages(tmp_path):
    """Reading the whole split adds no file-backed pages to the process (rows come through the page cache by
    pread, not a map) and no private copy of the split."""
    n, d = 32768, 1024  # 64 MiB of float16; a private float32 copy would be 128 MiB
    table = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    _write(tmp_path, table=table, chunk_size=2048)
    del table
    # As the trainer does (map large blocks, trim after a pass): freed batches leave the process, also those
    # that earlier tests' heap holes would otherwise keep, so what stays is what the reader holds.
    map_large_blocks()
    release_freed_memory()
    before = _memory_kib()
    reader = open_features(tmp_path, "train")  # reads every byte (checksum, inf/NaN scan)
    opened = _memory_kib()
    maps = open("/proc/self/maps").read()
    assert not any(str(f) in maps for f in _chunk_files(tmp_path))  # nothing of the cache stays mapped
    total = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, 512):
        total += reader.take(torch.arange(start, min(start + 512, n))).sum(0, dtype=torch.float64)
    for seed in range(8):  # random batches over the whole split, as partner draws are
        rows = torch.randint(0, n, (4096,), generator=torch.Generator().manual_seed(seed))
        total += 0 * reader.take(rows).sum(0, dtype=torch.float64)
    release_freed_memory()
    touched = _memory_kib()
    reference = sum(load_file(str(f))["features"].double().sum(0) for f in _chunk_files(tmp_path))
    torch.testing.assert_close(total, reference)
    assert opened["RssFile"] - before["RssFile"] < 8 * 1024, (before, opened)
    assert touched["RssFile"] - before["RssFile"] < 8 * 1024, (before, touched)
    assert touched["RssAnon"] - before["RssAnon"] < 16 * 1024, (before, touched)   # the split is 64 MiB


def test_a_chunk_truncated_after_opening_is_named(tmp_path):
    _write(tmp_path)
    reader = open_features(tmp_path, "train", verify=False)
    path = _chunk_files(tmp_path)[3]
    path.write_bytes(path.read_bytes()[:200])
    assert reader.take(torch.tensor([0, 999])).shape == (2, D)           # other chunks still read
    with pytest.raises(ValueError, match=f"{path.name} ended early"):
        reader.take(torch.tensor([3 * CHUNK + 10]))


@pytest.mark.parametrize("backing", ["cache", "tensor"])
def test_feature_set_subset_and_hidden_are_views(tmp_path, backing):
    table = _write(tmp_path, "float32")
    labels = _labels()
    fs = FeatureSet(open_features(tmp_path, "train"), labels, "train") if backing == "cache" else \
        FeatureSet(table, labels, "train")
    rows = torch.tensor([999, 5, 64, 5, 700, 63])
    sub = fs.subset(rows, "part")
    assert (len(sub), sub.num_features, sub.name) == (6, D, "part")
    assert torch.equal(sub.labels, labels[rows])
    index = torch.tensor([2, 0, 5, 5])
    assert torch.equal(sub.take(index), table[rows[index]])
    assert torch.equal(sub.features, table[rows])
    inner = sub.subset(torch.tensor([4, 0]))  # a subset of a subset maps twice
    assert torch.equal(inner.take(torch.tensor([0, 1])), table[[700, 999]])
    mask = labels == 3
    assert torch.equal(fs.subset(mask).take(torch.arange(int(mask.sum()))), table[mask])
    hidden = sub.hidden()
    assert bool((hidden.labels == -1).all()) and torch.equal(sub.labels, labels[rows])
    assert torch.equal(hidden.take(index), sub.take(index))
    assert hidden._rows is sub._rows is fs._rows  # one storage, nothing copied
    with pytest.raises(IndexError, match=r"split 'part': subset row 6 is outside \[0, 6\)"):
        sub.subset(torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="bool mask"):
        fs.subset(torch.tensor([0.5]))


def test_feature_set_refuses_mismatched_rows_and_labels(tmp_path):
    _write(tmp_path)
    with pytest.raises(ValueError, match=r"split 'x': features \(1000, 24\) and labels \(999,\) do not match"):
        FeatureSet(open_features(tmp_path, "train"), torch.zeros(999, dtype=torch.int64), "x")
    with pytest.raises(ValueError, match=r"features \(5,\)"):
        FeatureSet(torch.zeros(5), torch.zeros(5, dtype=torch.int64), "x")


def test_float16_tensor_set_converts_per_batch():
    half = _table().half()
    fs = FeatureSet(half, _labels(), "h")
    assert fs.features is half  # kept as given
    out = fs.take(torch.tensor([3, 1]))
    assert out.dtype == torch.float32 and torch.equal(out, half[[3, 1]].float())
    assert np.isclose(float(out[0, 0]), float(_table()[3, 0]), rtol=2**-10)
