"""The experiment file (configs/experiments/*.yaml): data, split protocol, features, seeds, ρ_u, methods.

    name, description          the experiment (its feature-cache and output directory name; a table caption)
    data:     archive, train, test, class_order
    split:    n1, rho_l, m1, n_val                       (docs/method.md §1.2; test = the test ImageFolder)
    features: backbone, weights, tag, image_size, batch_size
    seeds:    [0, 1, 2]          rho_u: [100, 1]
    trainer:  {run.steps: 3000, optim.lr: 3.0e-3, ...}   trainer config keys (selmix_dist.config) for
                                                         every method of kind 'trainer'
    methods:  {<name>: {kind: <registered kind>, label: <table row>, <the kind's settings>...}, ...}

Every key is documented (`describe()`); unknown keys are rejected with the closest valid name, as in the
trainer's config, whose helpers this module uses. Only what the trainer has no key for lives at the
experiment level: trainer settings are the trainer's own dotted keys (checked by `load_config`) and
objective parameters belong to the method entry. Overrides ``key=value`` address the same tree:
``split.n1=100``, ``seeds=[0]``, ``trainer.run.steps=500``, ``methods.fixmatch_la.steps=500``,
``methods.selmix_min_recall.params.omega=20``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selmix_dist.config import _closest, _coerce, doc, load_config
from selmix_dist.experiments.methods import KINDS, start_names, trainer_overrides


@dataclass
class DataSpec:
    archive: str = doc("Dataset archive <name>.tar.gz in --data-dir, unpacked once into <cache>/<name>.")
    train: str = doc("Training ImageFolder in the unpacked archive (labeled, unlabeled and validation images "
                     "are drawn from it).")
    test: str = doc("Test ImageFolder in the unpacked archive (used whole).")
    class_order: list[str] = doc("Classes from head (rank 0) to tail, by folder name or label id; empty: the "
                                 "source's order (sorted folder names).", default_factory=list)


@dataclass
class SplitSpec:
    n1: int = doc("Labeled images of the head class; class rank k gets ⌊n1 · rho_l^(−k/(K−1))⌋.")
    rho_l: float = doc("Labeled imbalance ratio ρ_l.")
    m1: int = doc("Unlabeled images of the head class (ratio: each run's ρ_u).")
    n_val: int = doc("Validation images per class, held out of the training ImageFolder.")


@dataclass
class FeatureSpec:
    backbone: str = doc("timm model name of the frozen backbone.", "tf_efficientnet_lite0")
    weights: str = doc("Backbone weights: 'lite', 'timm', 'none' or a checkpoint path.", "lite")
    tag: str = doc("Short backbone name in the cache directory <cache>/experiments/<name>/<tag>-<image_size>.",
                   "lite0")
    image_size: int = doc("Backbone input side in pixels (resize + center crop).", 128)
    batch_size: int = doc("Images per extraction batch.", 128)


@dataclass
class RunSpec:
    """The experiment's top-level keys besides its sections."""

    name: str = doc("Experiment name: directory of its feature cache and of its results.")
    seeds: list[int] = doc("Seeds: each seeds the split and the training.")
    rho_u: list[float] = doc("Unlabeled imbalance ratios, one table each.")
    description: str = doc("What the experiment is (free text).", "")
    trainer: dict = doc("Trainer config keys (e.g. optim.lr) for every method of kind 'trainer'.",
                        default_factory=dict)


@dataclass
class MethodSpec:
    """One table row: ``kind`` (a registered method kind), its label and its settings (the kind's dataclass)."""

    name: str
    kind: str
    label: str
    settings: Any


@dataclass
class ExperimentSpec:
    name: str
    description: str
    data: DataSpec
    split: SplitSpec
    features: FeatureSpec
    seeds: list[int]
    rho_u: list[float]
    trainer: dict
    methods: dict[str, MethodSpec]
    path: str       # the file it was read from, for messages


SECTIONS = {"data": DataSpec, "split": SplitSpec, "features": FeatureSpec}
ENTRY_KEYS = ("kind", "label")          # keys of a method entry that are not settings of its kind
_EMPTY = {int: 0, float: 0.0, str: "", bool: False, dict: {}}
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` coerced to ``hint`` (a scalar type, dict, list of a scalar type, or `scalar | list[scalar]`)
    by the trainer config's rules (`_coerce`)."""
    if typing.get_origin(hint) is types.UnionType:     # `str | list[str]`: a list stays a list
        one, many = sorted(typing.get_args(hint), key=lambda h: typing.get_origin(h) is list)
        return _typed(key, value, many if isinstance(value, list) else one)
    if typing.get_origin(hint) is list:
        values = value if isinstance(value, list) else [value]
        return [_typed(f"{key}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(values)]
    return _coerce(key, value, copy.copy(_EMPTY[hint]))


def _fill(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from mapping ``raw`` (the keys under ``prefix``, e.g. 'split.'):
    unknown keys rejected with the closest name, values coerced to the field types, fields without a default
    required. ``where`` (the file) starts every message."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: '{prefix.rstrip('.')}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in raw:
        if key not in names:
            raise ValueError(f"{where}: unknown key '{prefix}{key}'"
                             f"{_closest(f'{prefix}{key}', [prefix + n for n in names])}")
    missing = [prefix + f.name for f in fields if f.name not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    try:
        values = {k: _typed(prefix + k, v, hints[k]) for k, v in raw.items()}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    try:
        return cls(**values)
    except ValueError as e:   # a settings class's own check (__post_init__), which knows no prefix
        raise ValueError(f"{where}: {prefix}{e}") from None


def _method(name: str, raw: Any, where: str) -> MethodSpec:
    prefix = f"methods.{name}."
    if not _NAME.match(name):
        raise ValueError(f"{where}: method '{name}': a method name may use letters, digits and '_' only")
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"{where}: {prefix}kind is missing (one of {sorted(KINDS)}); got {raw!r}")
    kind = str(raw["kind"])
    if kind not in KINDS:
        raise ValueError(f"{where}: {prefix}kind: unknown method kind '{kind}'{_closest(kind, sorted(KINDS))}")
    settings = _fill(KINDS[kind].settings, {k: v for k, v in raw.items() if k not in ENTRY_KEYS}, where, prefix)
    return MethodSpec(name, kind, str(raw.get("label", name)), settings)


def _check_starts(methods: dict[str, MethodSpec], where: str) -> None:
    """Every ``start`` names other methods, and following starts never loops."""
    def visit(name: str, chain: list[str]) -> None:
        for start in start_names(methods[name].settings):
            if start not in methods:
                raise ValueError(f"{where}: methods.{name}.start: unknown method '{start}'"
                                 f"{_closest(start, list(methods))}")
            if start in chain:
                raise ValueError(f"{where}: methods.{chain[0]}: start heads form a loop "
                                 f"{' → '.join([*chain, start])}")
            visit(start, [*chain, start])

    for name in methods:
        visit(name, [name])


def _set(raw: dict, key: str, value: Any) -> None:
    """Apply override ``key`` to the raw tree; under ``trainer`` and ``params`` the rest of the key is one
    (dotted) leaf, e.g. ``methods.mixup.trainer.selmix.uniform``."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("trainer", "params"):
            parts = [*parts[:i + 1], ".".join(parts[i + 1:])]
            break
    if parts[0] == "methods" and len(parts) > 2 and parts[1] not in (raw.get("methods") or {}):
        raise ValueError(f"override '{key}': unknown method '{parts[1]}'"
                         f"{_closest(parts[1], list(raw.get('methods') or {}))}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """The experiment file, then ``key=value`` overrides, validated (ValueError naming the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        _set(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return parse_spec(raw, str(path))


def parse_spec(raw: dict, where: str) -> ExperimentSpec:
    """Validate an experiment tree (the parsed YAML); ``where`` names it in messages."""
    top = {k: v for k, v in raw.items() if k not in (*SECTIONS, "methods")}
    valid = [f.name for f in dataclasses.fields(RunSpec)] + [*SECTIONS, "methods"]
    for key in top:
        if key not in valid:
            raise ValueError(f"{where}: unknown key '{key}'{_closest(str(key), valid)}")
    run = _fill(RunSpec, top, where)
    sections = {}
    for name, cls in SECTIONS.items():
        if name not in raw and cls is not FeatureSpec:
            raise ValueError(f"{where}: missing section '{name}'")
        sections[name] = _fill(cls, raw.get(name) or {}, where, f"{name}.")
    if not run.seeds or not run.rho_u or min(run.seeds) < 0 or not min(run.rho_u) > 0:
        raise ValueError(f"{where}: seeds (>= 0) and rho_u (> 0) need one value each at least, got "
                         f"{run.seeds}, {run.rho_u}")
    try:
        load_config(None, trainer_overrides(run.trainer))
    except ValueError as e:
        raise ValueError(f"{where}: trainer: {e}") from None
    entries = raw.get("methods")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: 'methods' must map at least one method name to its entry")
    methods = {str(n): _method(str(n), m, where) for n, m in entries.items()}
    _check_starts(methods, where)
    for m in methods.values():
        try:
            KINDS[m.kind].check(m.settings, run.trainer)
        except ValueError as e:
            raise ValueError(f"{where}: methods.{m.name}: {e}") from None
    return ExperimentSpec(name=run.name, description=run.description, seeds=run.seeds, rho_u=run.rho_u,
                          trainer=run.trainer, methods=methods, path=where, **sections)


def spec_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """The validated experiment as plain data (results.json records what ran)."""
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "methods"}
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
    out["methods"] = {n: {"kind": m.kind, "label": m.label, **dataclasses.asdict(m.settings)}
                      for n, m in spec.methods.items()}
    return out


def describe() -> str:
    """Reference of every experiment key and of every method kind's settings, with defaults."""
    lines = []

    def section(prefix: str, cls: type) -> None:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            lines.append(f"{prefix}{f.name} = {default!r}\n    {f.metadata.get('doc', '')}")

    section("", RunSpec)
    for name, cls in SECTIONS.items():
        section(f"{name}.", cls)
    for kind in sorted(KINDS):
        lines.append(f"methods.<name> of kind '{kind}': {(KINDS[kind].run.__doc__ or '').strip()}")
        section(f"  [{kind}] ", KINDS[kind].settings)
    return "\n".join(lines)
