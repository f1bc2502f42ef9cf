from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selmix_dist.features.backbones import build_backbone
from selmix_dist.features.cache import CacheKey, extract_features, read_manifest, split_content_sha256
from selmix_dist.features.reader import load_features

N, CHUNK, BATCH = 37, 8, 3  # 5 chunks, the last one short; a chunk holds 3 batches of 3, 3, 2
MODEL = "test_resnet"  # timm's tiny ResNet (BatchNorm, pooled pre-logits): cheap to build and run


class TinySource:
    """ImageSource protocol over random uint8 images; `fail_at` raises on that index (a crash)."""

    def __init__(self, n: int = N, seed: int = 0, fail_at: int | None = None):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, 20, 26, 3), dtype=np.uint8)
        self._labels = rng.integers(0, 4, size=n).astype(np.int64)
        self.class_names = ["a", "b", "c", "d"]
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at image {i}")
        return Image.fromarray(self.images[i]), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels.copy()


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(MODEL, "none", seed=1, image_size=32)


def _extract(source, backbone, out, indices=None, labels=None, split="labeled", **kw):
    kw = {"batch_size": BATCH, "chunk_size": CHUNK, "num_workers": 0, "progress": False, **kw}
    return extract_features(source, indices, labels, backbone, out, split, **kw)


def _reference(source, backbone, indices) -> torch.Tensor:
    """Features one image at a time, straight through the backbone."""
    tf = backbone.transform(train=False)
    return torch.cat([backbone(tf(source[int(i)][0])[None]) for i in indices])


def _chunk_files(out, split="labeled"):
    return sorted((out / split).glob("chunk-*.safetensors"))


def test_extract_matches_per_image_forward(backbone, tmp_path):
    src = TinySource()
    indices = torch.tensor([5, 0, 36, 2] + list(range(6, 30)) + [1, 3, 4])
    stats = _extract(src, backbone, tmp_path, indices, dtype="float32")
    assert (stats.chunks, stats.chunks_written, stats.chunks_skipped, stats.noop) == (4, 4, 0, False)
    assert stats.images_extracted == len(indices)
    fs = load_features(tmp_path, "labeled")
    assert fs.features.dtype == torch.float32 and fs.features.shape == (len(indices), backbone.num_features)
    torch.testing.assert_close(fs.features, _reference(src, backbone, indices), rtol=1e-4, atol=1e-5)
    assert torch.equal(fs.labels, torch.as_tensor(src.labels())[indices])
    assert torch.equal(fs.indices, indices)
    assert [p.name for p in _chunk_files(tmp_path)] == [
        "chunk-000000000-000000008.safetensors", "chunk-000000008-000000016.safetensors",
        "chunk-000000016-000000024.safetensors", "chunk-000000024-000000031.safetensors"]


def test_float16_storage_and_unlabeled_labels(backbone, tmp_path):
    src = TinySource()
    hidden = torch.full((N,), -1)
    _extract(src, backbone, tmp_path, None, hidden, split="unlabeled")
    fs = load_features(tmp_path, "unlabeled")
    ref = _reference(src, backbone, range(N))
    assert fs.features.dtype == torch.float32
    # float16 keeps 11 significant bits: relative error <= 2^-11 (plus the batch-vs-single noise).
    torch.testing.assert_close(fs.features, ref, rtol=2**-10, atol=1e-4)
    assert torch.equal(fs.labels, hidden)
    manifest = read_manifest(tmp_path)
    assert manifest["key"]["dtype"] == "float16"
    assert manifest["splits"]["unlabeled"]["split_sha256"] == split_content_sha256(torch.arange(N), hidden)


def test_rerun_is_noop(backbone, tmp_path):
    src = TinySource()
    _extract(src, backbone, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in [*_chunk_files(tmp_path), tmp_path / "manifest.json"]}
    calls = []
    handle = backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        stats = _extract(src, backbone, tmp_path)
    finally:
        handle.remove()
    assert stats.noop and stats.chunks_written == 0 and stats.chunks_skipped == 5
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_resume_after_deleting_a_chunk(backbone, tmp_path):
    src = TinySource()
    _extract(src, backbone, tmp_path)
    before = load_features(tmp_path, "labeled")
    files = _chunk_files(tmp_path)
    files[2].unlink()
    kept = {p: p.stat().st_mtime_ns for p in files if p != files[2]}
    stats = _extract(src, backbone, tmp_path)
    assert (stats.noop, stats.chunks_written, stats.chunks_skipped) == (False, 1, 4)
    assert stats.images_extracted == CHUNK
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    after = load_features(tmp_path, "labeled")
    assert torch.equal(after.features, before.features) and torch.equal(after.labels, before.labels)


def test_interrupted_run_resumes_to_the_same_files(backbone, tmp_path):
    clean = tmp_path / "clean"
    _extract(TinySource(), backbone, clean)
    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="simulated crash at image 19"):
        _extract(TinySource(fail_at=19), backbone, broken)
    # Chunks [0,8) and [8,16) were finished before the crash; no partial or temporary file is left.
    assert [p.name for p in _chunk_files(broken)] == [p.name for p in _chunk_files(clean)][:2]
    assert sorted(p.name for p in (broken / "labeled").iterdir()) == [p.name for p in _chunk_files(broken)]
    with pytest.raises(ValueError, match="incomplete"):
        load_features(broken, "labeled")
    stats = _extract(TinySource(), backbone, broken)
    assert (stats.chunks_written, stats.chunks_skipped) == (3, 2)
    for a, b in zip(_chunk_files(clean), _chunk_files(broken), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (clean, broken)]
    assert manifests[0] == manifests[1]


def test_key_mismatch_is_an_error_and_never_overwrites(backbone, tmp_path):
    src = TinySource()
    _extract(src, backbone, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in [*_chunk_files(tmp_path), tmp_path / "manifest.json"]}
    with pytest.raises(ValueError, match=r"another key.*dtype"):
        _extract(src, backbone, tmp_path, dtype="float32")
    other = build_backbone(MODEL, "none", seed=2, image_size=32)
    with pytest.raises(ValueError, match=r"another key.*weights_sha256"):
        _extract(src, other, tmp_path)
    with pytest.raises(ValueError, match=r"another key.*split_sha256"):
        _extract(src, backbone, tmp_path, indices=torch.arange(N - 1))
    with pytest.raises(ValueError, match=r"another key.*chunk_size"):
        _extract(src, backbone, tmp_path, chunk_size=CHUNK + 1)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    with pytest.raises(ValueError, match=r"requested key.*weights_sha256"):
        load_features(tmp_path, "labeled", key=CacheKey.for_backbone(other, "float16"))
    load_features(tmp_path, "labeled", key=CacheKey.for_backbone(backbone, "float16"))
    with pytest.raises(ValueError, match="another split file"):
        load_features(tmp_path, "labeled", split_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"no split 'val'.*\['labeled'\]"):
        load_features(tmp_path, "val")

    stats = _extract(src, backbone, tmp_path, dtype="float32", overwrite=True)
    assert stats.chunks_written == 5
    assert read_manifest(tmp_path)["key"]["dtype"] == "float32"
    reference = _reference(src, backbone, range(N))
    torch.testing.assert_close(load_features(tmp_path, "labeled").features, reference, rtol=1e-4, atol=1e-5)


def test_splits_share_a_cache(backbone, tmp_path):
    src = TinySource()
    _extract(src, backbone, tmp_path, torch.arange(0, 10), split="labeled")
    _extract(src, backbone, tmp_path, torch.arange(10, N), split="val")
    assert sorted(read_manifest(tmp_path)["splits"]) == ["labeled", "val"]
    assert torch.equal(load_features(tmp_path, "val").indices, torch.arange(10, N))
    assert torch.equal(load_features(tmp_path, "labeled").indices, torch.arange(0, 10))


def test_corrupt_truncated_or_missing_chunk_named(backbone, tmp_path):
    src = TinySource()
    _extract(src, backbone, tmp_path)
    files = _chunk_files(tmp_path)
    target = files[1]
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0xFF  # a bit flip inside the indices tensor, header intact
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{target.name}.*corrupt"):
        load_features(tmp_path, "labeled")

    files[3].write_bytes(files[3].read_bytes()[:100])
    with pytest.raises(ValueError, match=files[3].name):
        load_features(tmp_path, "labeled", verify=False)

    files[4].unlink()
    os.replace(files[3], tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=files[3].name):
        load_features(tmp_path, "labeled", verify=False)

    # A rerun repairs all three (a corrupt chunk fails its checksum and is recomputed).
    stats = _extract(src, backbone, tmp_path)
    assert (stats.chunks_written, stats.chunks_skipped) == (3, 2)
    load_features(tmp_path, "labeled")


def test_missing_cache_and_bad_arguments(backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_features(tmp_path, "labeled")
    src = TinySource()
    with pytest.raises(ValueError, match="dtype"):
        _extract(src, backbone, tmp_path, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"indices outside \[0, 37\)"):
        _extract(src, backbone, tmp_path, torch.tensor([0, 37]))
    with pytest.raises(ValueError, match="2 labels for 3 indices"):
        _extract(src, backbone, tmp_path, torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_float16_overflow_is_an_error(tmp_path):
    loud = build_backbone(MODEL, "none", seed=1, image_size=32)
    loud.model.layer4[0].bn2.bias.add_(1e6)  # pre-logit features far beyond float16's 65504
    with pytest.raises(ValueError, match=r"non-finite features in chunk \[0, 8\).*float32"):
        _extract(TinySource(), loud, tmp_path)
    _extract(TinySource(), loud, tmp_path / "f32", dtype="float32")
    assert torch.isfinite(load_features(tmp_path / "f32", "labeled").features).all()


REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "extract_features.py"
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_tool_one_and_two_processes_write_identical_caches(tmp_path):
    from selmix_dist.data.sources import ArraySource
    from selmix_dist.data.splits import load_split, make_lt_split

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
             labels=np.repeat(np.arange(4), 10))
    split_dir = tmp_path / "split"
    make_lt_split(ArraySource.from_npz(tmp_path / "data.npz"), split_dir, n1=5, rho_l=2, m1=3, rho_u=1,
                  n_val=2, n_test=0, seed=0, test_source=ArraySource.from_npz(tmp_path / "data.npz"))
    args = ["--split-dir", str(split_dir), "--model", MODEL, "--weights", "none", "--seed", "1",
            "--image-size", "32", "--batch-size", "3", "--chunk-size", "4", "--num-workers", "0",
            "--splits", "labeled", "unlabeled", "val", "--json"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(TOOL), *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", str(TOOL), *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads(run.stdout.strip().splitlines()[-1]) for run in (one, two)]
    assert [r["world_size"] for r in reports] == [1, 2]
    assert [r["splits"][0]["written"] for r in reports] == [r["splits"][0]["chunks"] for r in reports]

    def listing(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    files = listing(tmp_path / "one")
    assert files == listing(tmp_path / "two")
    splits = {name: load_split(split_dir, name) for name in ("labeled", "unlabeled", "val")}
    expected_chunks = sum(-(-len(s.labels) // 4) for s in splits.values())
    assert len([f for f in files if f.suffix == ".safetensors"]) == expected_chunks
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    for name, split in splits.items():
        fs = load_features(tmp_path / "two", name, split_sha256=split.sha256)
        assert torch.equal(fs.indices, split.items) and torch.equal(fs.labels, split.labels)
