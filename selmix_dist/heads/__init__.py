"""Baselines on fixed backbone features: linear heads trained with CE / logit-adjusted CE, post-hoc logit
adjustment, FixMatch-LA-style self-training, plain feature mixup and CSST-style cost-sensitive fine-tuning."""

from __future__ import annotations

from selmix_dist.heads.cost_sensitive import (
    CostSensitiveResult,
    cost_sensitive_finetune,
    cost_sensitive_gain,
)
from selmix_dist.heads.evaluate import evaluate_head, predict
from selmix_dist.heads.fit import fit_head, head_objective
from selmix_dist.heads.losses import hybrid_cost_sensitive_loss, logit_adjusted_cross_entropy
from selmix_dist.heads.mixup import draw_mixup_batch, mixup_finetune, mixup_loss
from selmix_dist.heads.posthoc import posthoc_adjust
from selmix_dist.heads.selftrain import fixmatch_la_loss, pseudo_labels, self_train_head, strong_view

__all__ = [
    "CostSensitiveResult",
    "cost_sensitive_finetune",
    "cost_sensitive_gain",
    "draw_mixup_batch",
    "evaluate_head",
    "fit_head",
    "fixmatch_la_loss",
    "head_objective",
    "hybrid_cost_sensitive_loss",
    "logit_adjusted_cross_entropy",
    "mixup_finetune",
    "mixup_loss",
    "posthoc_adjust",
    "predict",
    "pseudo_labels",
    "self_train_head",
    "strong_view",
]
