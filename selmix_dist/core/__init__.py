"""Pure-torch core of selmix_dist: confusion matrices, metrics, objectives, the gain matrix, the pair
distribution and sampler, one refresh from validation statistics to P (``selmix_refresh``), and
deterministic randomness. No file I/O, no ranks, no accelerate."""

from __future__ import annotations

from .confusion import (
    class_support,
    confusion_counts,
    coverages,
    head_tail_masks,
    joint_confusion,
    precisions,
    recalls,
)
from .distribution import (
    SUPPORT_RTOL,
    TEMPERATURE_RULES,
    GainConvergence,
    distribution_and_temperature,
    distribution_entropy,
    effective_support,
    restrict_support,
    selmix_distribution,
)
from .gain import PRIORS, gain_matrix, gemm_floor, logit_derivative
from .metrics import METRIC_NAMES, compute_metrics, per_class_metrics
from .objectives import (
    ALIASES,
    GAIN_VARIANTS,
    OBJECTIVES,
    CustomObjective,
    GMean,
    HMean,
    HMeanMinCoverage,
    HMeanMinHeadTailCoverage,
    MeanRecall,
    MeanRecallMinCoverage,
    MeanRecallMinHeadTailCoverage,
    MinHeadTailRecall,
    MinRecall,
    Objective,
    build_objective,
)
from .refresh import Refresh, RefreshSettings, selmix_refresh, update_objective
from .rng import derive_seed, generator
from .sampler import PairBatch, PairSampler

__all__ = [
    "ALIASES",
    "GAIN_VARIANTS",
    "METRIC_NAMES",
    "OBJECTIVES",
    "PRIORS",
    "SUPPORT_RTOL",
    "TEMPERATURE_RULES",
    "CustomObjective",
    "GMean",
    "GainConvergence",
    "HMean",
    "HMeanMinCoverage",
    "HMeanMinHeadTailCoverage",
    "MeanRecall",
    "MeanRecallMinCoverage",
    "MeanRecallMinHeadTailCoverage",
    "MinHeadTailRecall",
    "MinRecall",
    "Objective",
    "PairBatch",
    "PairSampler",
    "Refresh",
    "RefreshSettings",
    "build_objective",
    "class_support",
    "compute_metrics",
    "confusion_counts",
    "coverages",
    "derive_seed",
    "distribution_and_temperature",
    "distribution_entropy",
    "effective_support",
    "gain_matrix",
    "gemm_floor",
    "generator",
    "head_tail_masks",
    "joint_confusion",
    "logit_derivative",
    "per_class_metrics",
    "precisions",
    "recalls",
    "restrict_support",
    "selmix_distribution",
    "selmix_refresh",
    "update_objective",
]
