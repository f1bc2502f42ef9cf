"""selmix_dist.data.sources: every source kind reads the same images and labels; bad input is named."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from selmix_dist.data.sources import (
    ArraySource,
    HFDiskSource,
    ImageFolderSource,
    SplitListSource,
    WebDatasetSource,
    open_source,
)


@pytest.fixture(scope="module")
def reference(small_image_folder):
    """The folder read with PIL directly: (relative paths, int64[N] labels, uint8[N,H,W,3], classes)."""
    classes = sorted(d.name for d in small_image_folder.iterdir())
    rel = [f"{c}/{p.name}" for c in classes for p in sorted((small_image_folder / c).iterdir())]
    labels = np.array([classes.index(r.split("/")[0]) for r in rel], dtype=np.int64)
    pixels = np.stack([np.asarray(Image.open(small_image_folder / r).convert("RGB")) for r in rel])
    return rel, labels, pixels, classes


def _build(kind: str, root: Path, reference, tmp: Path):
    rel, labels, pixels, classes = reference
    tmp.mkdir(parents=True, exist_ok=True)
    if kind == "imagefolder":
        return open_source("imagefolder", root)
    if kind == "splitlist":
        (tmp / "names.txt").write_text("\n".join(classes) + "\n")
        (tmp / "list.txt").write_text("".join(f"{r} {k}\n" for r, k in zip(rel, labels, strict=True)))
        return open_source("splitlist", tmp / "list.txt", root=root, class_names_file=tmp / "names.txt")
    if kind == "webdataset":
        (tmp / "wds").mkdir()
        with wds.ShardWriter(str(tmp / "wds" / "part-%04d.tar"), maxcount=128, verbose=0) as sink:
            for i, (r, k) in enumerate(zip(rel, labels, strict=True)):
                sink.write({"__key__": f"s{i:05d}", "jpg": (root / r).read_bytes(), "cls": str(int(k))})
        return open_source("webdataset", tmp / "wds", class_names=classes)
    if kind == "hf":
        features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=classes)})
        rows = {"img": [{"bytes": (root / r).read_bytes(), "path": None} for r in rel], "y": labels.tolist()}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp / "hf"))
        return open_source("hf", tmp / "hf", image_column="img", label_column="y")
    if kind == "array":
        return ArraySource(pixels, torch.from_numpy(labels), class_names=classes)
    if kind == "npz":
        np.savez(tmp / "arrays.npz", images=pixels, labels=labels)
        return open_source("array", tmp / "arrays.npz", class_names=classes)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["imagefolder", "splitlist", "webdataset", "hf", "array", "npz"])
def test_every_kind_reads_the_same_images_and_labels(kind, small_image_folder, reference, tmp_path):
    rel, labels, pixels, classes = reference
    source = _build(kind, small_image_folder, reference, tmp_path)
    assert len(source) == len(rel) == 300
    assert source.class_names == classes
    got = source.labels()
    assert got.dtype == torch.int64 and torch.equal(got, torch.from_numpy(labels))
    for i in range(len(source)):
        image, label = source[i]
        assert image.mode == "RGB" and label == labels[i]
        np.testing.assert_array_equal(np.asarray(image), pixels[i])
    with pytest.raises(IndexError):
        source[len(source)]


def test_file_backed_sources_expose_paths_and_stored_bytes(small_image_folder, reference, tmp_path):
    rel = reference[0]
    for kind in ("imagefolder", "splitlist"):
        source = _build(kind, small_image_folder, reference, tmp_path / kind)
        assert source.paths == rel
        assert source.raw(7) == ((small_image_folder / rel[7]).read_bytes(), "jpg")
    assert ArraySource(reference[2], reference[1]).raw(0) is None


def test_imagefolder_sorts_classes_and_keeps_empty_ones(tmp_path):
    for name, n in (("b", 2), ("a", 1), ("c", 0)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(tmp_path)
    assert source.class_names == ["a", "b", "c"]
    assert source.paths == ["a/0.png", "b/0.png", "b/1.png"]
    assert source.labels().tolist() == [0, 1, 1]
    assert np.asarray(source[2][0])[0, 0].tolist() == [10, 0, 0]


def test_grey_arrays_become_rgb():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(4, 5, 6), dtype=np.uint8)
    for images in (grey, grey[..., None]):
        source = ArraySource(images, [0, 1, 0, 2])
        assert source.class_names == ["class_0", "class_1", "class_2"]
        rgb = np.asarray(source[3][0])
        assert rgb.shape == (5, 6, 3)
        np.testing.assert_array_equal(rgb, np.repeat(grey[3][..., None], 3, axis=2))


def test_splitlist_defaults_and_class_name_labels(small_image_folder, reference, tmp_path):
    rel = reference[0]
    (tmp_path / "l.txt").write_text(f"# comment\n{rel[0]} 3\n\n{rel[40]} 1\n")
    source = SplitListSource(tmp_path / "l.txt", root=small_image_folder)
    assert source.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert source.labels().tolist() == [3, 1]
    (tmp_path / "n.txt").write_text(f"{rel[0]} {reference[3][2]}\n")
    named = SplitListSource(tmp_path / "n.txt", root=small_image_folder, class_names=reference[3])
    assert named.labels().tolist() == [2]


def test_hf_dataset_dict_split_and_plain_int_labels(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(png, format="PNG")
    rows = {"image": [{"bytes": png.getvalue(), "path": None}] * 3, "label": [2, 0, 1]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    source = HFDiskSource(tmp_path / "dd", split="train")
    assert source.class_names == ["class_0", "class_1", "class_2"]
    assert source.labels().tolist() == [2, 0, 1]
    assert np.asarray(source[1][0])[2, 2].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]"):
        HFDiskSource(tmp_path / "dd")


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown source kind 'tiff'.*imagefolder"):
        open_source("tiff", "/nowhere")


def test_missing_and_corrupt_images_name_the_file(tmp_path, small_image_folder):
    root = tmp_path / "folder"
    shutil.copytree(small_image_folder, root)
    source = ImageFolderSource(root)
    missing, corrupt, truncated = (root / source.paths[i] for i in (0, 1, 2))
    missing.unlink()
    corrupt.write_bytes(b"definitely not a jpeg")
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        source[0]
    with pytest.raises(FileNotFoundError, match=str(missing)):
        source.raw(0)
    for i, path in ((1, corrupt), (2, truncated)):
        with pytest.raises(ValueError, match=f"cannot decode image {path}"):
            source[i]


def test_split_list_bad_labels_name_file_and_line(tmp_path, small_image_folder, reference):
    rel, classes = reference[0], reference[3]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(classes) + "\n")
    cases = {
        "high.txt": (f"{rel[0]} 0\n\n{rel[1]} 10\n", r"label 10 outside \[0, 10\) at .*high.txt:3"),
        "negative.txt": (f"{rel[0]} -1\n", r"label -1 outside \[0, 10\) at .*negative.txt:1"),
        "name.txt": (f"{rel[0]} 0\n{rel[1]} zebra\n", r"name.txt:2: unknown class name 'zebra'"),
        "short.txt": ("lonely\n", r"short.txt:1: expected 'item label'"),
    }
    for file, (text, message) in cases.items():
        (tmp_path / file).write_text(text)
        with pytest.raises(ValueError, match=message):
            SplitListSource(tmp_path / file, root=small_image_folder, class_names_file=names)
    (tmp_path / "gone.txt").write_text("nowhere/0001.jpg 0\n")
    with pytest.raises(FileNotFoundError, match="nowhere/0001.jpg"):
        SplitListSource(tmp_path / "gone.txt", root=small_image_folder)[0]
    unlabeled = SplitListSource(tmp_path / "negative.txt", root=small_image_folder, class_names_file=names,
                                allow_unlabeled=True)
    assert unlabeled.labels().tolist() == [-1]


def _shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})
    return path


def test_webdataset_bad_shards_name_the_shard(tmp_path, small_image_folder, reference):
    jpg = (small_image_folder / reference[0][0]).read_bytes()
    good = _shard(tmp_path / "good.tar", {"a": {"jpg": jpg, "cls": b"1"}, "b": {"jpg": jpg, "cls": b"0"}})
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00garbage" * 100)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:1500])
    cases = [
        (garbage, "corrupt webdataset shard .*garbage.tar"),
        (truncated, "corrupt webdataset shard .*truncated.tar"),
        (_shard(tmp_path / "nocls.tar", {"a": {"jpg": jpg}}), r"nocls.tar: sample 'a' needs one image"),
        (_shard(tmp_path / "text.tar", {"a": {"jpg": jpg, "cls": b"cat"}}), r"text.tar: a.cls holds 'cat'"),
        (_shard(tmp_path / "high.tar", {"a": {"jpg": jpg, "cls": b"0"}, "b": {"jpg": jpg, "cls": b"7"}}),
         r"label 7 outside \[0, 3\) at sample 'b' \(b.jpg\) in shard .*high.tar"),
    ]
    for shard, message in cases:
        with pytest.raises(ValueError, match=message):
            WebDatasetSource(shard, num_classes=3)
    bad_image = _shard(tmp_path / "badimg.tar", {"a": {"jpg": b"not a jpeg", "cls": b"0"}})
    source = WebDatasetSource(bad_image)
    with pytest.raises(ValueError, match=r"cannot decode image member a.jpg of shard .*badimg.tar"):
        source[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in directory .*empty"):
        WebDatasetSource(tmp_path / "empty")
    assert WebDatasetSource(good).labels().tolist() == [1, 0]


def test_hf_bad_input_names_row_column_and_class(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    image = {"bytes": png.getvalue(), "path": None}

    def save(name, rows, label_feature):
        features = datasets.Features({"image": datasets.Image(), "label": label_feature})
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    high = save("high", {"image": [image] * 3, "label": [0, 1, 5]}, datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"label 5 outside \[0, 3\) at row 2 of column 'label' in .*high"):
        HFDiskSource(high, class_names=["a", "b", "c"])
    names = save("names", {"image": [image] * 2, "label": ["b", "zebra"]}, datasets.Value("string"))
    with pytest.raises(ValueError, match=r"unknown class name 'zebra' in row 1"):
        HFDiskSource(names, class_names=["a", "b"])
    assert HFDiskSource(save("ok", {"image": [image], "label": ["b"]}, datasets.Value("string")),
                        class_names=["a", "b"]).labels().tolist() == [1]
    with pytest.raises(ValueError, match=r"image_column 'img' not among the columns \['image', 'label'\]"):
        HFDiskSource(high, image_column="img")
    junk = {"bytes": b"junk", "path": None}
    broken = save("broken", {"image": [junk], "label": [0]}, datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"cannot decode image row 0 of .*broken"):
        HFDiskSource(broken)[0]
    with pytest.raises(FileNotFoundError, match="not found: .*absent"):
        HFDiskSource(tmp_path / "absent")


def test_array_bad_input_names_the_field():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="images: dtype float32"):
        ArraySource(images.astype(np.float32), [0, 0, 0])
    with pytest.raises(ValueError, match=r"images: shape \(3, 4, 4, 2\)"):
        ArraySource(np.zeros((3, 4, 4, 2), dtype=np.uint8), [0, 0, 0])
    with pytest.raises(ValueError, match="labels: 2 labels for 3 images"):
        ArraySource(images, [0, 0])
    with pytest.raises(ValueError, match=r"label 4 outside \[0, 2\) at labels\[1\]"):
        ArraySource(images, [0, 4, 1], class_names=["x", "y"])
    with pytest.raises(ValueError, match=r"label -2 outside \[0, 2\) at labels\[2\]"):
        ArraySource(images, [0, 1, -2])
