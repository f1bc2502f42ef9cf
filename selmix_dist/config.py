"""Experiment configuration: typed sections, YAML files, `section.key=value` overrides.

Every key carries its documentation (`doc(...)` metadata); `describe()` prints the full reference and a
test asserts that no key is undocumented. Unknown keys are rejected with the closest valid name, so a
typo never silently falls back to a default.

It sits at the package root, below features/, experiments/ and train/, which all read it: no data-side module
imports the trainer's package to learn its settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def doc(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class RunConfig:
    dir: str = doc("Run directory: resolved config, TensorBoard events, checkpoints, report.", "runs/default")
    seed: int = doc("Seed; every random draw is a pure function of (seed, rank, step).", 0)
    steps: int = doc("Total SGD steps (the cosine schedule spans them). 0: no step; the start head is evaluated "
                     "and checkpointed as a complete run at step 0 (run.extend_steps continues it).", 10000)
    refresh_every: int = doc("Steps between refreshes of C, prototypes, multipliers, G and P.", 50)
    test_every: int = doc("Steps between test-set evaluations (0: only at start and end).", 500)
    checkpoint_every: int = doc("Steps between checkpoints (0: only at the end and on signals).", 500)
    keep_checkpoints: int = doc("How many step checkpoints to keep (the best one is kept separately).", 2)
    resume: str = doc("'auto' (latest valid checkpoint in run.dir, else start), 'never', or a checkpoint path.",
                      "auto")
    early_stop: bool = doc("Stop when the max gain is stable (docs/method.md §4.3), decided identically on all ranks.",
                           False)
    early_stop_window: int = doc("Refreshes in the early-stop window.", 10)
    early_stop_tol: float = doc("Relative tolerance of the early-stop test.", 0.05)
    signal_poll_every: int = doc("Steps between cross-rank checks for SIGTERM/SIGUSR1.", 10)
    requeue: bool = doc("On SIGUSR1/SIGTERM under SLURM, requeue the job after checkpointing.", False)
    overwrite: bool = doc("Start fresh in a run directory of ours that has checkpoints: removes exactly the files "
                          "its manifest (run.json) lists, nothing else.", False)
    extend_steps: bool = doc("Allow a resume with a larger run.steps (also of a finished run). The cosine schedule "
                             "is re-stretched over the new total, so the lr steps up at the resume step to what the "
                             "longer run would have had there.", False)
    lock_stale_seconds: float = doc("A run-directory lock held from another host counts as stale (its holder "
                                    "dead) once its heartbeat is older than this.", 600.0)


@dataclass
class DataConfig:
    features: str = doc("Feature-cache directory (mode 'features'), written by tools/extract_features.py.", "")
    split_dir: str = doc("Split directory of tools/make_lt_split.py: class names; the images in mode 'online'.",
                         "")
    labeled_split: str = doc("Name of the labeled split.", "labeled")
    unlabeled_split: str = doc("Name of the unlabeled split (partners in the semi-supervised setting).",
                               "unlabeled")
    val_split: str = doc("Name of the validation split (drives C, prototypes and the gain).", "val")
    test_split: str = doc("Name of the test split ('' for none).", "test")
    num_classes: int = doc("Expected number of classes K (0: take it from the data; else must match).", 0)
    head_fraction: float = doc("Fraction of classes, by train frequency, that form the head set.", 0.9)
    eval_batch_size: int = doc("Batch size for validation, test and pseudo-labelling passes.", 4096)


@dataclass
class ModelConfig:
    mode: str = doc("'features' (steps on cached features) or 'online' (frozen backbone forward each step).",
                    "features")
    backbone: str = doc("timm model name (mode 'online').", "tf_efficientnet_lite0")
    weights: str = doc("Backbone weights (mode 'online'): 'lite', 'timm', 'none' or a checkpoint path.", "lite")
    image_size: int = doc("Backbone input side in mode 'online' (0: the model's pretrained config).", 0)
    init_head: str = doc("Starting head: 'auto' ('fixmatch_la' in setting 'semi', 'la' in 'supervised', the paper's "
                         "rule; docs/defaults.md for the validation study), 'la' / 'ce' (fit on labeled "
                         "features), 'fixmatch_la' (the LA head self-trained on unlabeled features), 'zeros', or a "
                         "path to a saved head.", "auto")
    init_head_steps: int = doc("Optimisation steps used to fit the starting head.", 300)


@dataclass
class SelMixConfig:
    setting: str = doc("'semi' (partners: unlabeled, by pseudo-label) or 'supervised' (partners: labeled).",
                       "semi")
    temperature: float = doc("T of P = softmax(G / T) (inverse temperature s = 1/T); see temperature_rule.", 0.1)
    temperature_rule: str = doc("'absolute' (P = softmax(G / T), the release), 'relative' (G / (T·max|G|), "
                                "scale-free; docs/method.md §4.1) or 'support' (T solved at every refresh so that P's "
                                "effective number of pairs exp(H(P)) is target_support·K). Default 'support': a fixed "
                                "T collapses P onto one pair when the backbone or image size changes the feature norm "
                                "(docs/defaults.md).", "support")
    target_support: float = doc("Rule 'support': effective number of pairs of P as a multiple of K (0.25: chosen "
                                "on validation of CIFAR-10-LT at 64 and 128 px and Tiny-ImageNet-LT at 128 px).",
                                0.25)
    eps: float = doc("ε added to every entry of P before renormalising.", 1e-8)
    positive_only: bool = doc("Keep only pairs with positive gain (uniform if none).", True)
    uniform: bool = doc("Ignore the gain and draw pairs uniformly (the plain-mixup baseline).", False)
    gain_variant: str = doc("'exact' (mixed prototype in both terms) or 'official' (reproduces the release).",
                            "exact")
    include_bias: bool = doc("Model the bias update in the gain.", False)
    prior: str = doc("Class prior in dC/dA: 'balanced' (K) or 'empirical' (validation row sums).", "balanced")
    mixup_min: float = doc("λ ~ U[mixup_min, 1]; the gain uses the mean (mixup_min + 1) / 2.", 0.6)
    confusion_temperature: float = doc("T of the soft validation confusion the gain sees: each sample adds "
                                       "softmax(logits / T) to its true class's row (docs/method.md §2.5). 0: the "
                                       "argmax counts of the paper.", 0.0)
    coverage_floor: bool = doc("Objectives with a per-class coverage constraint (mean_recall_min_coverage, "
                               "h_mean_min_coverage): at every refresh, a copy of the head whose biases the "
                               "coverage auction raised until every class has ⌈αV/K⌉ validation predictions is "
                               "what the gain, the evaluations, best.pt and the final head see; the training head "
                               "keeps its own biases (docs/method.md §2.6). Not with DeepSpeed.", False)
    pseudo_threshold: float = doc("Confidence threshold for pseudo-labels (0: plain argmax).", 0.0)
    pseudo_label_every: int = doc("Refreshes between pseudo-labelling passes over the unlabeled split "
                                  "(1: every refresh, as in the paper; larger amortises a big unlabeled set).", 1)
    pseudo_logit_adjust: float = doc("τ of logit adjustment applied before pseudo-labelling (0: none).", 0.0)


@dataclass
class ObjectiveConfig:
    name: str = doc("Objective (selmix_dist.core.OBJECTIVES), e.g. min_recall, h_mean, "
                    "mean_recall_min_coverage.", "min_recall")
    params: dict = doc("Hyper-parameters per objective, {objective: {param: value}} (e.g. {min_recall: {omega: 50}, "
                       "mean_recall_min_coverage: {alpha: 0.95}}): switching objective.name picks that objective's "
                       "group. A flat mapping, and objective.params.<param>=value on the command line, belong to "
                       "the objective named in the same place.", default_factory=dict)

    def active(self) -> dict[str, Any]:
        """The parameters of the selected objective (a flat mapping set in code is taken as they are)."""
        from selmix_dist.core import OBJECTIVES

        if self.params and not all(k in OBJECTIVES for k in self.params):
            return dict(self.params)
        return dict(self.params.get(self.name, {}))


@dataclass
class OptimConfig:
    batch_size: int = doc("Pairs per step per rank.", 64)
    lr: float = doc("Head learning rate.", 3e-4)
    momentum: float = doc("SGD momentum (the release uses none).", 0.0)
    weight_decay: float = doc("Weight decay on the head weight (never on the bias).", 5e-4)
    schedule: str = doc("'cosine' (to 0 over run.steps) or 'constant'.", "cosine")
    warmup_steps: int = doc("Linear warm-up steps.", 0)


@dataclass
class LogConfig:
    tensorboard: bool = doc("Write TensorBoard events (rank 0 only) under run.dir/tb.", True)
    log_every: int = doc("Steps between loss / lr scalars.", 10)
    image_every: int = doc("Refreshes between P and G heatmap images.", 10)
    progress: bool = doc("tqdm progress bar on rank 0.", True)


@dataclass
class PluginConfig:
    enabled: bool = doc("After training, tune per-class log-weights on validation for the run's objective on the best "
                        "head (docs/method.md §6.1): checkpoints/plugin.pt (export with --which plugin) and "
                        "plugin.json.", False)
    iterations: int = doc("Linearised-ascent iterations of the plug-in weights.", 50)
    polish_sweeps: int = doc("Coordinate-polish sweeps of the plug-in weights (0: none).", 2)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    selmix: SelMixConfig = field(default_factory=SelMixConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("model", "mode"): ("features", "online"),
    ("selmix", "setting"): ("semi", "supervised"),
    ("selmix", "gain_variant"): ("exact", "official"),
    ("selmix", "temperature_rule"): ("absolute", "relative", "support"),
    ("selmix", "prior"): ("balanced", "empirical"),
    ("optim", "schedule"): ("cosine", "constant"),
}


def all_keys() -> dict[str, str]:
    """Every dotted key with its documentation."""
    out = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            out[f"{section.name}.{f.name}"] = f.metadata.get("doc", "")
    return out


def describe() -> str:
    """The configuration reference: one line per key with default and documentation."""
    default = Config().to_dict()
    lines = []
    for key, text in all_keys().items():
        sec, name = key.split(".")
        lines.append(f"{key} = {default[sec][name]!r}\n    {text}")
    return "\n".join(lines)


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(key: str, value: Any, current: Any) -> Any:
    if isinstance(current, bool):
        if isinstance(value, str):
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key '{key}' expects true/false, got {value!r}")
    if isinstance(current, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            raise ValueError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value)
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}' expects a number, got {value!r}") from None
    if isinstance(current, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' expects a mapping, got {value!r}")
        return value
    if isinstance(current, str):
        return "" if value is None else str(value)
    raise AssertionError(f"unhandled config type for {key}")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _apply(cfg: Config, key: str, value: Any, origin: str) -> None:
    if key == "selmix.relative_temperature":  # before temperature_rule existed: true/false meant these rules
        cfg.selmix.temperature_rule = "relative" if _coerce(key, value, False) else "absolute"
        return
    parts = key.split(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if parts[0] not in sections:
        raise ValueError(f"{origin}: unknown config section '{parts[0]}'{_closest(parts[0], sections)}")
    section = getattr(cfg, parts[0])
    names = [f.name for f in dataclasses.fields(section)]
    if len(parts) == 3 and parts[1] == "params" and parts[0] == "objective":
        _pending_params.append((parts[2], yaml.safe_load(value) if isinstance(value, str) else value))
        return
    if len(parts) != 2 or parts[1] not in names:
        name = parts[1] if len(parts) > 1 else ""
        valid = [f"{parts[0]}.{n}" for n in names]
        raise ValueError(f"{origin}: unknown config key '{key}'{_closest(f'{parts[0]}.{name}', valid)}")
    coerced = _coerce(key, value, getattr(section, parts[1]))
    if key == "objective.params":
        coerced = _grouped(coerced, origin)
    choices = _CHOICES.get((parts[0], parts[1]))
    if choices and coerced not in choices:
        raise ValueError(f"{origin}: config key '{key}' must be one of {list(choices)}, got {coerced!r}")
    setattr(section, parts[1], coerced)


def _grouped(params: dict, origin: str) -> dict:
    """{objective: {param: value}} as is; a flat mapping is kept for the objective named at `origin`."""
    from selmix_dist.core import OBJECTIVES

    if params and all(k in OBJECTIVES and isinstance(v, dict) for k, v in params.items()):
        return {k: dict(v) for k, v in params.items()}
    _pending_params.extend(params.items())
    return {}


# objective parameters given flat, waiting for the objective name of the same file / command line
_pending_params: list[tuple[str, Any]] = []


def _adopt_pending(cfg: Config) -> None:
    while _pending_params:
        key, value = _pending_params.pop(0)
        cfg.objective.params.setdefault(cfg.objective.name, {})[key] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (sections of keys), then `section.key=value` overrides, validated."""
    _pending_params.clear()
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        for sec, values in raw.items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section '{sec}' must be a mapping of keys")
            for key, value in values.items():
                _apply(cfg, f"{sec}.{key}", value, str(path))
        _adopt_pending(cfg)  # a file's flat parameters belong to the file's objective
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form section.key=value")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "", "command line")
    _adopt_pending(cfg)
    validate(cfg)
    return cfg


# Ranges of every numeric key: (low, high, low inclusive). Checked at load, naming the key.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "run.steps": (0, math.inf, True),
    "run.refresh_every": (1, math.inf, True),
    "run.test_every": (0, math.inf, True),
    "run.checkpoint_every": (0, math.inf, True),
    "run.keep_checkpoints": (1, math.inf, True),
    "run.early_stop_window": (1, math.inf, True),
    "run.early_stop_tol": (0, math.inf, True),
    "run.signal_poll_every": (1, math.inf, True),
    "run.lock_stale_seconds": (0, math.inf, False),
    "data.num_classes": (0, math.inf, True),
    "data.head_fraction": (0, 1, False),
    "data.eval_batch_size": (1, math.inf, True),
    "model.image_size": (0, math.inf, True),
    "model.init_head_steps": (1, math.inf, True),
    "selmix.temperature": (0, math.inf, False),
    "selmix.target_support": (0, math.inf, False),
    "selmix.eps": (0, 1, True),
    "selmix.mixup_min": (0, 1, True),
    "selmix.confusion_temperature": (0, math.inf, True),
    "selmix.pseudo_threshold": (0, 1, True),
    "selmix.pseudo_label_every": (1, math.inf, True),
    "selmix.pseudo_logit_adjust": (0, math.inf, True),
    "optim.batch_size": (1, math.inf, True),
    "optim.lr": (0, math.inf, False),
    "optim.momentum": (0, 1, True),
    "optim.weight_decay": (0, math.inf, True),
    "optim.warmup_steps": (0, math.inf, True),
    "log.log_every": (1, math.inf, True),
    "log.image_every": (1, math.inf, True),
    "plugin.iterations": (0, math.inf, True),
    "plugin.polish_sweeps": (0, math.inf, True),
}


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> None:
    """Every range and every cross-key rule that does not need the data, each error naming its key."""
    for key, (low, high, inclusive) in _RANGES.items():
        value = _value(cfg, key)
        above = value >= low if inclusive else value > low
        if not (above and value <= high and math.isfinite(float(value))):
            bound = ("[" if inclusive else "(") + f"{low:g}, " + (f"{high:g}]" if math.isfinite(high) else "∞)")
            raise ValueError(f"config key '{key}' must lie in {bound}, got {value!r}")
    if cfg.data.head_fraction >= 1:
        raise ValueError(f"config key 'data.head_fraction' must be below 1 (some classes form the tail), got "
                         f"{cfg.data.head_fraction!r}")
    if not str(cfg.run.dir).strip():
        raise ValueError("config key 'run.dir' is empty: name a directory for the run")
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        raise ValueError(f"config key 'run.resume': checkpoint {cfg.run.resume} does not exist")
    if cfg.optim.warmup_steps > cfg.run.steps:
        raise ValueError(f"config key 'optim.warmup_steps' ({cfg.optim.warmup_steps}) exceeds 'run.steps' "
                         f"({cfg.run.steps})")
    if cfg.model.init_head == "fixmatch_la" and cfg.selmix.setting == "supervised":
        raise ValueError("config key 'model.init_head=fixmatch_la' self-trains on the unlabeled split, which "
                         "'selmix.setting=supervised' does not use: choose model.init_head=la (or ce)")
    if cfg.selmix.setting == "semi" and not cfg.data.unlabeled_split:
        raise ValueError("config key 'data.unlabeled_split' is empty but 'selmix.setting=semi' draws partners "
                         "from it: name the split, or set selmix.setting=supervised")
    from selmix_dist.core import OBJECTIVES

    if cfg.objective.name not in OBJECTIVES:
        raise ValueError(f"config key 'objective.name': unknown objective '{cfg.objective.name}'"
                         f"{_closest(cfg.objective.name, sorted(OBJECTIVES))}")
    if cfg.selmix.coverage_floor and "coverage_violation" not in OBJECTIVES[cfg.objective.name].constraint_metrics:
        with_floor = sorted(n for n, o in OBJECTIVES.items() if "coverage_violation" in o.constraint_metrics)
        raise ValueError(f"config key 'selmix.coverage_floor' needs an objective with a per-class coverage "
                         f"constraint ({', '.join(with_floor)}); objective.name is '{cfg.objective.name}'")


# Keys that cannot change what a run computes: a resume may change them (the change is recorded).
RESULT_NEUTRAL = frozenset({
    "run.dir", "run.resume", "run.overwrite", "run.requeue", "run.signal_poll_every", "run.checkpoint_every",
    "run.keep_checkpoints", "run.test_every", "run.extend_steps", "run.lock_stale_seconds",
    "log.tensorboard", "log.log_every", "log.image_every", "log.progress",
    # the plug-in runs after the last step, on the head training chose: it never changes the training itself
    "plugin.enabled", "plugin.iterations", "plugin.polish_sweeps",
})
_PATH_KEYS = frozenset({"data.features", "data.split_dir"})


def flatten(cfg: Config | dict) -> dict[str, Any]:
    """{'section.key': value} of a config (or of its to_dict())."""
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    return {f"{sec}.{key}": value for sec, values in d.items() for key, value in values.items()}


def resume_changes(saved: dict[str, Any], current: Config) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(refused, allowed) key → (saved, current) differences between a checkpoint's flat config and `current`.

    Refused: any key that changes results. Allowed: result-neutral keys, paths that resolve to the same
    place, and a longer run.steps when run.extend_steps=true. Keys the checkpoint does not know (an older
    format) are not compared.
    """
    refused, allowed = {}, {}
    now = flatten(current)
    for key, old in saved.items():
        if key not in now or now[key] == old:
            continue
        new = now[key]
        same_path = key in _PATH_KEYS and old and new and Path(old).resolve() == Path(new).resolve()
        extend = key == "run.steps" and current.run.extend_steps and new > old
        (allowed if key in RESULT_NEUTRAL or same_path or extend else refused)[key] = (old, new)
    return refused, allowed


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
