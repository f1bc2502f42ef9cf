"""FrozenBackbone.spec() / build_backbone_from_spec: the recorded recipe rebuilds the same weights and transform."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from selmix_dist.features.backbones import build_backbone, build_backbone_from_spec


def same_backbone(a, b) -> bool:
    return a.weights_sha256 == b.weights_sha256 and a.transform_description() == b.transform_description()


def test_seeded_random_weights_round_trip_through_json():
    backbone = build_backbone("test_efficientnet", "none", seed=3, image_size=40, crop_pct=1.0, mean=(0.1, 0.2, 0.3),
                              std=(0.5, 0.6, 0.7), interpolation="bilinear")
    spec = json.loads(json.dumps(backbone.spec()))
    assert spec["weights"] == "none" and spec["seed"] == 3 and spec["image_size"] == 40
    assert spec["data_config"]["crop_pct"] == 1.0 and spec["data_config"]["mean"] == [0.1, 0.2, 0.3]
    assert same_backbone(build_backbone_from_spec(spec), backbone)
    # the seed is part of the recipe: another seed is another backbone
    assert not same_backbone(build_backbone_from_spec({**spec, "seed": 4}), backbone)


def test_weights_file_is_recorded_by_absolute_path_with_its_classifier_size(tmp_path, monkeypatch):
    source = build_backbone("test_efficientnet", "none", seed=1, num_classes=7)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)
    backbone = build_backbone("test_efficientnet", "w.safetensors", num_classes=7, image_size=48)
    spec = backbone.spec()
    assert spec["weights"] == str(tmp_path / "w.safetensors") and spec["num_classes"] == 7 and spec["seed"] is None
    monkeypatch.chdir("/")
    rebuilt = build_backbone_from_spec(spec)
    assert same_backbone(rebuilt, backbone) and rebuilt.weights_sha256 == source.weights_sha256


def test_bad_specs_are_named():
    spec = build_backbone("test_efficientnet", "none", image_size=32).spec()
    with pytest.raises(ValueError, match=r"my cache lacks key\(s\) \['data_config'\]"):
        build_backbone_from_spec({k: v for k, v in spec.items() if k != "data_config"}, "my cache")
    tall = {**spec, "data_config": {**spec["data_config"], "input_size": [3, 32, 48]}}
    with pytest.raises(ValueError, match="not square"):
        build_backbone_from_spec(tall)
    other_mode = {**spec, "data_config": {**spec["data_config"], "crop_mode": "squash"}}
    with pytest.raises(ValueError, match="crop_mode"):
        build_backbone_from_spec(other_mode)
    backbone = build_backbone("test_efficientnet", "none")
    backbone.weights_source = "hub:somewhere"
    with pytest.raises(ValueError, match="hub:somewhere"):
        backbone.spec()
