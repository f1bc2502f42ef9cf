"""selmix_dist.data.shards: sources and split lists round-trip through webdataset shards."""

from __future__ import annotations

import hashlib
import importlib.util
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from selmix_dist.data.shards import shard_count_warning, write_shards
from selmix_dist.data.sources import ArraySource, ImageFolderSource, WebDatasetSource
from selmix_dist.data.splits import load_split, make_lt_split

REPO = Path(__file__).resolve().parents[2]


def test_jpeg_files_are_stored_unchanged(small_image_folder, tmp_path):
    source = ImageFolderSource(small_image_folder)
    shards = write_shards(source, tmp_path, maxcount=128)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    back = WebDatasetSource(tmp_path)
    assert back.class_names == source.class_names
    assert torch.equal(back.labels(), source.labels())
    assert back.keys == [f"{i:09d}" for i in range(len(source))]
    with tarfile.open(shards[1]) as tar:
        member = tar.getmember(f"{128:09d}.jpg")
        assert tar.extractfile(member).read() == (small_image_folder / source.paths[128]).read_bytes()
    for i in range(0, len(source), 7):
        assert np.array_equal(np.asarray(back[i][0]), np.asarray(source[i][0]))


def test_arrays_round_trip_losslessly_as_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(25, 5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=25)
    shards = write_shards(ArraySource(images, labels, num_classes=4), tmp_path, maxcount=10)
    with tarfile.open(shards[2]) as tar:
        assert sorted(tar.getnames()) == sorted(f"{i:09d}.{e}" for i in range(20, 25) for e in ("cls", "png"))
    back = WebDatasetSource(tmp_path)
    for shard, members in zip(shards, (20, 20, 10), strict=True):
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == members
    assert back.labels().tolist() == labels.tolist() and back.class_names == [f"class_{k}" for k in range(4)]
    for i in range(25):
        np.testing.assert_array_equal(np.asarray(back[i][0]), images[i])


def test_jpeg_reencoding_is_close(tmp_path):
    x = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    write_shards(ArraySource(x[None], [0]), tmp_path, reencode="jpg")
    back = WebDatasetSource(tmp_path)
    assert back.raw(0)[1] == "jpg"
    assert np.abs(np.asarray(back[0][0]).astype(int) - x).mean() < 3


def test_equal_inputs_give_identical_shards(tmp_path):
    source = ArraySource(np.arange(48, dtype=np.uint8).reshape(4, 2, 2, 3), [0, 1, 1, 0])

    def digest(out):
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in write_shards(source, out, maxcount=3)]

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_few_shards_warn_and_existing_shards_are_kept(tmp_path):
    source = ArraySource(np.zeros((10, 2, 2), dtype=np.uint8), [0] * 10)
    assert shard_count_warning(4, 10, world_size=2, workers=2) is None
    with pytest.warns(UserWarning, match=r"3 shard\(s\) < world_size × workers = 2 × 2 = 4"):
        write_shards(source, tmp_path, maxcount=4, world_size=2, workers=2)
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(source, tmp_path, maxcount=5)
    write_shards(source, tmp_path, maxcount=5, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    for kw, message in (({"maxcount": 0}, "maxcount must be a positive integer"),
                        ({"indices": [1, 1]}, "distinct positions"),
                        ({"indices": [0], "labels": [3]}, r"labels must lie in \[-1, 1\)")):
        with pytest.raises(ValueError, match=message):
            write_shards(source, tmp_path / "bad", **kw)


def test_split_lists_become_shards_with_hidden_labels(small_image_folder, tmp_path):
    source = ImageFolderSource(small_image_folder)
    make_lt_split(source, tmp_path / "split", n1=10, rho_l=5, m1=8, rho_u=2, n_val=2, seed=0, n_test=2)
    for name in ("labeled", "unlabeled"):
        split = load_split(tmp_path / "split", name, source)
        write_shards(source, tmp_path / name, maxcount=16, indices=split.items, labels=split.labels)
        back = WebDatasetSource(tmp_path / name)
        assert back.keys == [f"{int(i):09d}" for i in split.items]
        assert torch.equal(back.labels(), split.labels)
        first = int(split.items[0])
        assert back.raw(0)[0] == (small_image_folder / source.paths[first]).read_bytes()
    assert (WebDatasetSource(tmp_path / "unlabeled").labels() == -1).all()


def test_make_shards_tool(small_image_folder, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.warns(UserWarning, match="some data-loader workers would get no shard"):
        assert tool.main(["--kind", "imagefolder", "--source", str(small_image_folder), "--out",
                          str(tmp_path), "--maxcount", "100", "--world-size", "2", "--workers", "4"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 300 samples in 3 shard(s)" in printed
    assert "WARNING: 3 shard(s) < world_size × workers = 2 × 4 = 8" in printed
    assert len(WebDatasetSource(tmp_path)) == 300
