"""Method kinds of an experiment: a registry ``kind -> MethodKind`` filled by the ``@method_kind`` decorator.

A kind is a function ``(MethodContext, settings) -> nn.Linear`` plus its settings dataclass (the keys a
method entry of that kind may set, each documented and validated). Adding a baseline is one decorated
function; the runner and the tables never name a kind.

Start heads: a kind with a ``start`` setting receives a copy of that method's head (``ctx.start(s)``), so
the experiment file states every start-head rule (e.g. the FixMatch-LA analogue starts from the LA head).
``start`` may list several methods: the one whose head scores best on validation, on the metric the method
is compared on, is used (``heads.start.choose_by_validation``), and its name goes into the result's ``info``;
a plug-in with ``start_by: plugin`` fits every candidate and keeps the best plug-in on validation instead.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selmix_dist.config import doc
from selmix_dist.features.sets import FeatureSet, TrainData

# Trainer keys the runner sets itself (run directory, seed, a fresh run each time) or that come from the
# method entry (objective name and parameters); an experiment file may not set them under `trainer`.
RUNNER_KEYS = ("run.dir", "run.seed", "run.resume", "run.overwrite", "objective.name", "objective.params")
# Runner defaults an experiment file may override: no TensorBoard, no progress bar, no test-set passes
# (the trainer never sees the test split here) and no intermediate checkpoints.
TRAINER_DEFAULTS = {"log.tensorboard": False, "log.progress": False, "run.test_every": 0,
                    "run.checkpoint_every": 0}


@dataclass(frozen=True)
class MethodKind:
    """A registered kind: ``run(ctx, settings) -> head``; ``uses_unlabeled``: its head depends on the
    unlabeled set (so on ρ_u). The callables take (settings, the experiment's trainer keys):
    ``resolve`` -> the settings as they take effect (library defaults filled in; they identify a stored
    result); ``check`` raises ValueError on bad settings; ``compared_on`` -> the metric on which the tables
    compare the method with every method that has none (None: it is such a baseline)."""

    name: str
    settings: type
    run: Callable[[MethodContext, Any], nn.Linear]
    uses_unlabeled: bool
    resolve: Callable[[Any, dict], dict]
    check: Callable[[Any, dict], None]
    compared_on: Callable[[Any, dict], str | None]


KINDS: dict[str, MethodKind] = {}


def _as_dict(settings: Any, _experiment_trainer: dict) -> dict:
    return dataclasses.asdict(settings)


def _nothing(_settings: Any, _experiment_trainer: dict) -> None:
    return None


def method_kind(name: str, settings: type, *, uses_unlabeled: bool,
                resolve: Callable[[Any, dict], dict] = _as_dict, check: Callable[[Any, dict], None] = _nothing,
                compared_on: Callable[[Any, dict], str | None] = _nothing) -> Callable:
    """Register the decorated ``fn(ctx, settings) -> nn.Linear`` as method kind ``name``."""
    def register(fn: Callable[[MethodContext, Any], nn.Linear]) -> Callable:
        if name in KINDS:
            raise ValueError(f"method kind '{name}' is registered twice")
        KINDS[name] = MethodKind(name, settings, fn, uses_unlabeled, resolve, check, compared_on)
        return fn
    return register


# ------------------------------------------------------------------------------------------------ context
class TrainerSession:
    """The accelerator shared by every trainer run of a process, and the closing of the last trainer."""

    def __init__(self) -> None:
        self._accelerator = None
        self._last = None

    @property
    def accelerator(self) -> Any:
        if self._accelerator is None:
            from selmix_dist import distributed as dist

            self._accelerator = dist.make_accelerator()
        return self._accelerator

    def finished(self, trainer: Any) -> None:
        self._last = trainer

    def close(self) -> None:
        """Call once at the end of the process (Trainer.close tears the process group down)."""
        if self._last is not None:
            self._last.close()
            self._last = None


def all_rows(fs: FeatureSet) -> torch.Tensor:
    """Every row of a feature set as float32[N, d]."""
    return fs.take(torch.arange(len(fs)))


@dataclass(frozen=True)
class SplitRows:
    """One split's tensors, built once per (seed, ρ_u): labeled ``x`` float32[N, d] with ``y`` int64[N],
    unlabeled ``xu`` float32[U, d], validation ``xv`` float32[V, d] with ``yv`` int64[V]."""

    x: torch.Tensor
    y: torch.Tensor
    xu: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor

    @classmethod
    def of(cls, data: TrainData) -> SplitRows:
        return cls(all_rows(data.labeled), data.labeled.labels, all_rows(data.partners), all_rows(data.val),
                   data.val.labels)


@dataclass
class MethodContext:
    """What a method sees for one (ρ_u, seed): ``data`` (labeled, validation, unlabeled partners with labels
    hidden; no test split) and its ``rows``, the head mask bool[K] of the evaluation, the start heads it may
    copy, the experiment's trainer keys, its run directory, and ``info`` for notes stored with its result."""

    data: TrainData
    rows: SplitRows
    seed: int
    head_mask: torch.Tensor
    experiment_trainer: dict
    run_dir: Path
    starts: dict[str, nn.Linear]
    session: TrainerSession
    start_metric: str = "mean_recall"
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.data.num_classes

    def start(self, settings: Any) -> nn.Linear:
        """A copy of the head named by ``settings.start``; of several, the best on validation ``start_metric``."""
        names = start_names(settings)
        if len(names) == 1:
            return copy.deepcopy(self.starts[names[0]])
        from selmix_dist.heads.start import choose_by_validation

        name, scores = choose_by_validation({n: self.starts[n] for n in names}, self.rows.xv, self.rows.yv,
                                            self.start_metric, self.head_mask)
        self.info.update(start=name, start_val=scores)
        return copy.deepcopy(self.starts[name])


def start_names(settings: Any) -> list[str]:
    """The methods a method starts from: none, one (``start: la``) or candidates (``start: [la, fixmatch_la]``)."""
    start = getattr(settings, "start", "")
    return list(start) if isinstance(start, list) else [start] if start else []


# ----------------------------------------------------------------------------------------------- settings
def _start_field() -> Any:
    return doc("Method whose (final) head this one starts from, or a list of methods: the one whose head is best "
               "on validation (on the metric this method is compared on) is used.")


@dataclass
class FitHeadSettings:
    loss: str = doc("'ce' (ERM) or 'logit_adjusted' (logit-adjusted CE).")
    tau: float = doc("τ of the logit adjustment.", 1.0)
    weight_decay: float = doc("Weight decay on the weight matrix.", 5e-4)
    max_iter: int = doc("L-BFGS iterations (float32).", 200)


@dataclass
class PosthocSettings:
    start: str | list[str] = _start_field()
    tau: float = doc("The bias is shifted by −τ log π (π: labeled class frequencies).", 1.0)


@dataclass
class SelfTrainSettings:
    start: str | list[str] = _start_field()
    steps: int = doc("FixMatch-LA steps (threshold 0.95, λ_u = 1, μ = 2, batch 64).", 2000)
    lr: float = doc("Learning rate (Nesterov 0.9, schedule cos(7πt/16T)).", 3e-3)
    weight_decay: float = doc("Weight decay on the weight matrix.", 5e-4)


@dataclass
class ObjectiveSettings:
    start: str | list[str] = _start_field()
    objective: str = doc("Objective (selmix_dist.core.OBJECTIVES).", "mean_recall")
    params: dict = doc("Objective parameters; unset ones take the library defaults (the release's values).",
                       default_factory=dict)


@dataclass
class TrainerSettings(ObjectiveSettings):
    trainer: dict = doc("Trainer config keys for this method, over the experiment's `trainer` keys.",
                        default_factory=dict)


@dataclass
class CsstSettings(ObjectiveSettings):
    steps: int = doc("Fine-tuning steps (SGD, Nesterov 0.9, cosine).", 3000)
    lr: float = doc("Learning rate.", 3e-3)
    weight_decay: float = doc("Weight decay on the weight matrix.", 5e-4)
    refresh_every: int = doc("Steps between multiplier / cost-matrix refreshes on validation.", 50)


@dataclass
class PluginSettings(ObjectiveSettings):
    iterations: int = doc("Linearised-ascent iterations of the log-weights (core.plugin.fit_plugin).", 50)
    step: float = doc("First ascent step in logit units (then step/sqrt(t+1)).", 0.5)
    polish_sweeps: int = doc("Coordinate-polish sweeps over the classes (0: none).", 2)
    start_by: str = doc("Of several `start` heads: 'head' (the best head on validation, then its plug-in) or "
                        "'plugin' (the plug-in of every candidate; the best on validation, by its plug-in score). "
                        "'plugin' compares every candidate after the same tuning of its biases.", "head")

    def __post_init__(self) -> None:
        if self.start_by not in ("head", "plugin"):
            raise ValueError(f"start_by must be 'head' or 'plugin', got {self.start_by!r}")


@dataclass
class CrtSettings:
    steps: int = doc("SGD steps on class-balanced batches (Nesterov 0.9, cosine).", 2000)
    batch_size: int = doc("Batch size.", 256)
    lr: float = doc("Learning rate.", 1e-3)
    weight_decay: float = doc("Weight decay on the weight matrix.", 5e-4)


@dataclass
class TauNormSettings:
    start: str | list[str] = _start_field()
    taus: list[float] = doc("Candidate τ, the best by `metric` on validation is kept.",
                            default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])
    metric: str = doc("Validation metric that chooses τ.", "mean_recall")


@dataclass
class LwsSettings:
    start: str | list[str] = _start_field()
    steps: int = doc("SGD steps on class-balanced batches (Nesterov 0.9, cosine).", 2000)
    batch_size: int = doc("Batch size.", 256)
    lr: float = doc("Learning rate of the scales.", 1e-2)


# ------------------------------------------------------------------------------------------- objectives
def _probe_objective(settings: ObjectiveSettings) -> Any:
    """The objective for two classes, one head and one tail: enough to validate the name and parameters of
    every objective and to read its defaults and metrics (ValueError for a bad name or parameter)."""
    from selmix_dist.core import build_objective

    return build_objective(settings.objective, 2, head=torch.tensor([True, False]), **settings.params)


def objective_params(settings: ObjectiveSettings) -> dict:
    """The objective's parameters with its defaults filled in."""
    return dict(_probe_objective(settings).params)


def method_meta(kind: str, label: str, settings: Any, experiment_trainer: dict) -> dict:
    """What the tables need of a method: label, start, the metric it is compared on (None: a baseline) and,
    for a per-class coverage constraint cov_j ≥ α/K, its α."""
    meta = {"label": label, "kind": kind, "start": getattr(settings, "start", None),
            "compared_on": KINDS[kind].compared_on(settings, experiment_trainer), "coverage_alpha": None}
    if isinstance(settings, ObjectiveSettings):
        objective = _probe_objective(settings)
        if "min_coverage" in objective.constraint_metrics:
            meta["coverage_alpha"] = objective.params["alpha"]
    return meta


def start_metric(kind: str, settings: Any, experiment_trainer: dict) -> str:
    """The validation metric that picks a method's start among several: the metric it is compared on, else its
    objective's (a plug-in starts from the head best on the metric it tunes), else mean recall."""
    compared = KINDS[kind].compared_on(settings, experiment_trainer)
    if compared:
        return compared
    if isinstance(settings, ObjectiveSettings):
        return _probe_objective(settings).target_metric or "mean_recall"
    return "mean_recall"


def trainer_overrides(mapping: dict) -> list[str]:
    """``{"optim.lr": 3e-3}`` -> ``["optim.lr=0.003"]`` for ``load_config`` (JSON values are YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in mapping.items()]


def trainer_config(settings: TrainerSettings, experiment_trainer: dict, seed: int = 0,
                   run_dir: str = "<per run>") -> Any:
    """The trainer Config of a method: runner defaults, the experiment's keys, the method's keys, then the
    runner's own keys and the method's objective (ValueError naming a bad or reserved key)."""
    from selmix_dist.config import load_config

    for key in [*experiment_trainer, *settings.trainer]:
        if key in RUNNER_KEYS or key.startswith("objective."):
            raise ValueError(f"trainer key '{key}' is set by the runner or the method entry (objective, params)")
    fixed = {"run.dir": run_dir, "run.seed": seed, "run.resume": "never", "run.overwrite": True,
             "objective.name": settings.objective, "objective.params": settings.params}
    return load_config(None, trainer_overrides({**TRAINER_DEFAULTS, **experiment_trainer, **settings.trainer,
                                                **fixed}))


def _objective_resolved(settings: ObjectiveSettings, _experiment_trainer: dict) -> dict:
    return {**dataclasses.asdict(settings), "params": objective_params(settings)}


def _objective_check(settings: ObjectiveSettings, _experiment_trainer: dict) -> None:
    objective_params(settings)


def _trainer_resolved(settings: TrainerSettings, experiment_trainer: dict) -> dict:
    cfg = trainer_config(settings, experiment_trainer).to_dict()
    del cfg["run"]["dir"], cfg["run"]["seed"]  # per run; the seed identifies a result separately
    return {"start": settings.start, "config": cfg, "params": objective_params(settings)}


def _trainer_check(settings: TrainerSettings, experiment_trainer: dict) -> None:
    objective_params(settings)      # first: its message names the method's `objective` key
    _trainer_resolved(settings, experiment_trainer)


def _selmix_target(settings: TrainerSettings, experiment_trainer: dict) -> str | None:
    """SelMix is compared on its objective's metric; uniform mixup ignores the objective (a baseline)."""
    if trainer_config(settings, experiment_trainer).selmix.uniform:
        return None
    return _probe_objective(settings).target_metric


# ------------------------------------------------------------------------------------------------ kinds
@method_kind("fit_head", FitHeadSettings, uses_unlabeled=False,
             check=lambda s, _t: _one_of("loss", s.loss, ("ce", "logit_adjusted")))
def fit_linear_head(ctx: MethodContext, s: FitHeadSettings) -> nn.Linear:
    """A CE or logit-adjusted CE head on the labeled features, fitted by L-BFGS."""
    from selmix_dist.heads import fit_head

    return fit_head(ctx.rows.x, ctx.rows.y, ctx.k, loss=s.loss, tau=s.tau, weight_decay=s.weight_decay,
                    max_iter=s.max_iter, seed=ctx.seed, dtype=torch.float32)


@method_kind("posthoc", PosthocSettings, uses_unlabeled=False)
def posthoc_logit_adjustment(ctx: MethodContext, s: PosthocSettings) -> nn.Linear:
    """The start head with bias b − τ log π (Menon et al. 2021)."""
    from selmix_dist.heads import posthoc_adjust

    return posthoc_adjust(ctx.start(s), torch.bincount(ctx.rows.y, minlength=ctx.k).to(torch.float64), tau=s.tau)


@method_kind("self_train", SelfTrainSettings, uses_unlabeled=True)
def fixmatch_la_analogue(ctx: MethodContext, s: SelfTrainSettings) -> nn.Linear:
    """FixMatch-style self-training of the start head on the unlabeled features, LA loss on labeled data."""
    from selmix_dist.heads import self_train_head

    return self_train_head(ctx.start(s), ctx.rows.x, ctx.rows.y, ctx.rows.xu, steps=s.steps, lr=s.lr,
                           weight_decay=s.weight_decay, seed=ctx.seed)


@method_kind("trainer", TrainerSettings, uses_unlabeled=True, resolve=_trainer_resolved, check=_trainer_check,
             compared_on=_selmix_target)
def selmix_trainer(ctx: MethodContext, s: TrainerSettings) -> nn.Linear:
    """SelMix (or, with ``selmix.uniform: true``, mixup with uniform pairs) through the Trainer; the final head."""
    from selmix_dist.train.trainer import Trainer

    cfg = trainer_config(s, ctx.experiment_trainer, ctx.seed, str(ctx.run_dir))
    acc = ctx.session.accelerator
    trainer = Trainer(cfg, ctx.data, accelerator=acc, init_head=ctx.start(s))
    summary = trainer.run()
    ctx.session.finished(trainer)
    if summary["stopped_by"] == "signal":   # an interrupted run's head is no result: nothing may be stored
        raise KeyboardInterrupt(f"signal received during method run {ctx.run_dir} at step {summary['step']}")
    return copy.deepcopy(trainer.plain_head())


@method_kind("csst", CsstSettings, uses_unlabeled=True, resolve=_objective_resolved, check=_objective_check)
def csst_style(ctx: MethodContext, s: CsstSettings) -> nn.Linear:
    """CSST-style cost-sensitive fine-tuning with self-training on the unlabeled features."""
    from selmix_dist.core import build_objective
    from selmix_dist.heads import cost_sensitive_finetune

    objective = build_objective(s.objective, ctx.k, head=ctx.head_mask, **s.params)
    r = ctx.rows
    return cost_sensitive_finetune(ctx.start(s), r.x, r.y, r.xv, r.yv, objective, steps=s.steps, lr=s.lr,
                                   weight_decay=s.weight_decay, refresh_every=s.refresh_every, seed=ctx.seed,
                                   unlabeled_features=r.xu).head


@method_kind("plugin", PluginSettings, uses_unlabeled=False, resolve=_objective_resolved, check=_objective_check)
def plugin_classifier(ctx: MethodContext, s: PluginSettings) -> nn.Linear:
    """Post-hoc plug-in: the start head's bias plus per-class log-weights tuned on validation for the objective;
    the weights' validation score goes into ``info``."""
    from selmix_dist.core import build_objective
    from selmix_dist.heads.plugin import fit_plugin_head

    objective = build_objective(s.objective, ctx.k, head=ctx.head_mask, **s.params)

    def fit(start: nn.Linear):
        return fit_plugin_head(start, ctx.rows.xv, ctx.rows.yv, objective, ctx.head_mask,
                               iterations=s.iterations, step=s.step, polish_sweeps=s.polish_sweeps)

    names = start_names(s)
    if s.start_by == "plugin" and len(names) > 1:
        fitted = {name: fit(copy.deepcopy(ctx.starts[name])) for name in names}
        name = max(names, key=lambda n: fitted[n][1].score)   # ties: the first listed
        ctx.info.update(start=name, start_plugin_val={n: list(r.score) for n, (_, r) in fitted.items()})
        head, result = fitted[name]
    else:
        head, result = fit(ctx.start(s))
    ctx.info.update(plugin_val_score=list(result.score), plugin_start_val_score=list(result.start_score))
    return head


@method_kind("crt", CrtSettings, uses_unlabeled=False)
def classifier_retraining(ctx: MethodContext, s: CrtSettings) -> nn.Linear:
    """cRT (Kang et al. 2020): a new head trained on class-balanced batches of the labeled features."""
    from selmix_dist.heads.decoupling import classifier_retrain

    return classifier_retrain(ctx.rows.x, ctx.rows.y, ctx.k, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                              weight_decay=s.weight_decay, seed=ctx.seed)


@method_kind("tau_norm", TauNormSettings, uses_unlabeled=False)
def tau_normalised(ctx: MethodContext, s: TauNormSettings) -> nn.Linear:
    """τ-normalised start head (Kang et al. 2020), τ chosen on validation; the chosen τ goes into ``info``."""
    from selmix_dist.heads.decoupling import select_tau, tau_normalize

    start = ctx.start(s)
    tau, scores = select_tau(start, ctx.rows.xv, ctx.rows.yv, s.taus, metric=s.metric)
    ctx.info.update(tau=tau, val_scores=dict(zip(map(str, s.taus), scores, strict=True)))
    return tau_normalize(start, tau)


@method_kind("lws", LwsSettings, uses_unlabeled=False)
def learnable_weight_scaling(ctx: MethodContext, s: LwsSettings) -> nn.Linear:
    """LWS (Kang et al. 2020): the start head's rows rescaled by scales learnt on class-balanced batches."""
    from selmix_dist.heads.decoupling import learn_weight_scaling

    return learn_weight_scaling(ctx.start(s), ctx.rows.x, ctx.rows.y, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                                seed=ctx.seed)


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{key} must be one of {list(valid)}, got {value!r}")
