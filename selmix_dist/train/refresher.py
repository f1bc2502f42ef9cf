"""The refresh (docs/method.md §4.3): measure C and the prototypes, pseudo-label, recompute G and P, rebuild sampling.

Order of one refresh, identical on every rank: at selmix.coverage_floor, the bias shift that meets the coverage
floor on the whole validation set (rank 0's authoritative), applied to a copy of the head → sharded validation
pass of that head (counts + feature sums, and soft counts at selmix.confusion_temperature > 0, reduced) →
pseudo-labels of the unlabeled split (sharded, gathered; every `pseudo_label_every` refreshes) →
`core.selmix_refresh` (multipliers, ∂ψ/∂C, G, P) → rank 0's P broadcast as the authority → pair sampler. The
training head itself is never changed here. Until the last step nothing is committed, so a preemption during
the passes leaves the state of the last step boundary intact. Only the sampling state (P, partner labels, the
step that decided them) is checkpointed, with the head; everything else of a refresh is logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from selmix_dist import distributed as dist
from selmix_dist.config import SelMixConfig
from selmix_dist.core import PairSampler, joint_confusion
from selmix_dist.core.forecast import Forecast, GainForecast
from selmix_dist.core.objectives import Objective
from selmix_dist.core.plugin import coverage_floor
from selmix_dist.core.refresh import Refresh, RefreshSettings, selmix_refresh
from selmix_dist.features.sets import FeatureSet
from selmix_dist.heads.plugin import head_logits, plugin_head
from selmix_dist.memory import release_freed_memory
from selmix_dist.train.evaluator import Evaluator, Poll


@dataclass
class RefreshRecord:
    """What one refresh measured and decided, for logging."""

    step: int
    counts: torch.Tensor                 # int64[K, K] validation confusion counts
    result: Refresh                      # C, prototypes, ψ', G, P, T
    partner_labels: torch.Tensor         # int32[N2] (−1: no label)
    timings: dict[str, float] = field(default_factory=dict)
    gain_rate: float = 0.0               # Σ P∘G: ψ's expected change per unit lr of one step (core.forecast)
    forecast: Forecast | None = None     # the previous refresh's prediction against what this one measured
    floor_raised: int = 0                # classes whose bias the coverage floor raised (selmix.coverage_floor)
    floored_head: torch.nn.Linear | None = None   # the measured head at selmix.coverage_floor (a copy)


@dataclass
class CoverageFloor:
    """A copy of a head whose biases meet the coverage floor, and how many classes were raised."""

    head: torch.nn.Linear
    raised: int


class Refresher:
    """Owns the objective, P, the partner labels and the pair sampler of a run."""

    def __init__(self, selmix: SelMixConfig, objective: Objective, evaluator: Evaluator, *, refresh_every: int,
                 labeled: FeatureSet, partners: FeatureSet, val: FeatureSet, log_prior: torch.Tensor,
                 lr_sum: Callable[[int, int], float]):
        """``lr_sum(start, stop)``: the learning rates of steps start … stop − 1 summed (the gain forecast)."""
        self.selmix, self.refresh_every, self.objective, self.evaluator = selmix, refresh_every, objective, evaluator
        self.labeled, self.partners, self.val = labeled, partners, val
        self.semi = selmix.setting == "semi"
        self.settings = RefreshSettings(
            temperature=selmix.temperature, temperature_rule=selmix.temperature_rule,
            target_support=selmix.target_support, eps=selmix.eps, positive_only=selmix.positive_only,
            uniform=selmix.uniform, gain_variant=selmix.gain_variant, include_bias=selmix.include_bias,
            prior=selmix.prior, mixup_min=selmix.mixup_min)
        self.pseudo_prior = log_prior * selmix.pseudo_logit_adjust if selmix.pseudo_logit_adjust else None
        self.step: int | None = None           # the step whose refresh decided P (None: none yet)
        self.distribution: torch.Tensor | None = None
        self.partner_labels: torch.Tensor | None = None
        self.sampler: PairSampler | None = None
        self.forecast = GainForecast()
        self.lr_sum = lr_sum

    def due(self, step: int) -> bool:
        return step % self.refresh_every == 0 and self.step != step

    def _pseudo_label_due(self, step: int) -> bool:
        """At the first refresh, then every `selmix.pseudo_label_every` refreshes."""
        index = step // self.refresh_every
        return self.partner_labels is None or index % self.selmix.pseudo_label_every == 0

    def refresh(self, head: torch.nn.Linear, step: int, poll: Poll) -> RefreshRecord:
        """One refresh at `step` (every rank). Raises evaluator.Interrupted if `poll` fires during a pass."""
        timings, t0 = {}, time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t0
            now = time.perf_counter()
            timings[name], t0 = now - t0, now

        floor = self.coverage_floor(head) if self.selmix.coverage_floor else None
        floored = floor.head if floor else head
        lap("coverage_floor")
        soft_t = self.selmix.confusion_temperature
        val = self.evaluator.statistics(floored, self.val, with_features=True, soft_temperature=soft_t, poll=poll)
        lap("eval")
        pseudo = self.semi and self._pseudo_label_due(step)
        if pseudo:
            labels = self.evaluator.pseudo_labels(floored, self.partners, threshold=self.selmix.pseudo_threshold,
                                                  log_prior=self.pseudo_prior, poll=poll)
        else:
            labels = self.partner_labels if self.semi else self.labeled.labels.to(torch.int32)
        lap("pseudo_labels")
        # ψ of this C with the multipliers that decided the last P: what the last forecast predicted the change of
        # (with the floor, of the floored head: the one G was computed at).
        hard = joint_confusion(val.counts)
        psi_now = float(self.objective.psi(hard))
        forecast = self.forecast.close(step, psi_now, self.lr_sum(self.step, step) if self.step is not None else 0.0)
        # From here on the refresh commits: the objective's multipliers move and P is replaced.
        device = self.evaluator.device
        soft = joint_confusion(val.soft_counts) if val.soft_counts is not None else None
        result = selmix_refresh(val.counts, val.feature_sums.to(device), floored.weight.detach().to(torch.float64),
                                floored.bias.detach().to(torch.float64), self.objective, self.settings, confusion=soft)
        rate = GainForecast.rate(result.gain, result.distribution)
        # The forecast is judged on the metric of hard predictions, whichever C the gain saw (docs/method.md §4.4).
        self.forecast.open(step, rate, psi_now)
        lap("gain")
        # Every rank computed the same P from the same reduced statistics; rank 0's copy is authoritative.
        result.distribution = dist.broadcast_tensor(result.distribution)
        lap("broadcast")
        self._commit(step, result.distribution, labels)
        release_freed_memory()   # the passes' buffers, which glibc would otherwise keep in this rank's heap
        lap("sampler")
        timings["total"] = sum(timings.values())
        return RefreshRecord(step, val.counts, result, labels, timings, rate, forecast,
                             floor.raised if floor else 0, floored if floor else None)

    def coverage_floor(self, head: torch.nn.Linear) -> CoverageFloor:
        """``head`` with its biases raised to meet the objective's coverage floor on the whole validation set
        (``core.plugin.coverage_floor``, docs/method.md §2.6), as a copy. Every rank computes the shift from the
        same head and features; rank 0's is the authority. Costs the [V, K] validation logits on every rank."""
        logits = head_logits(head, self.val.take(torch.arange(len(self.val))))
        shift = dist.broadcast_tensor(coverage_floor(logits, self.objective.params["alpha"]))
        return CoverageFloor(plugin_head(head, shift), int((shift > shift.min()).sum()))

    def _commit(self, step: int, distribution: torch.Tensor, partner_labels: torch.Tensor) -> None:
        self.step, self.distribution, self.partner_labels = step, distribution, partner_labels
        self.sampler = PairSampler(self.labeled.labels, partner_labels, self.objective.num_classes)
        self.sampler.set_distribution(distribution)

    def draw(self, batch_size: int, *, seed: int, rank: int, step: int):
        return self.sampler.sample(batch_size, seed=seed, rank=rank, step=step)

    def state_dict(self) -> dict | None:
        if self.step is None:
            return None
        return {"step": self.step, "distribution": self.distribution.cpu(), "partner_labels": self.partner_labels,
                "forecast": self.forecast.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self._commit(int(state["step"]), state["distribution"], state["partner_labels"].to(torch.int32))
            self.forecast.load_state_dict(state.get("forecast"))   # absent in checkpoints before the forecast
