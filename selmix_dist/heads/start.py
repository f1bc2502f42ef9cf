"""The head SelMix starts from (`model.init_head`): fitted on the labeled features, self-trained, or read;
and the choice between candidate heads on validation (`choose_by_validation`, used by the experiment runner).

Fitting is deterministic: L-BFGS from zeros, seeded self-training, and a fixed CPU thread count whatever
the launcher, because the thread count changes the order of float reductions and so the fitted head (one
seed must give one start head under `python` and under `accelerate launch`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from selmix_dist.heads.evaluate import evaluate_head
from selmix_dist.heads.fit import fit_head
from selmix_dist.heads.selftrain import self_train_head
from selmix_dist.torch_files import load_tensors

FITTED = ("la", "ce", "fixmatch_la")
AUTO = "auto"   # 'fixmatch_la' in setting 'semi', 'la' in 'supervised': the paper's rule (docs/defaults.md, start head)
# Self-training draws init_head_steps × 128 unlabeled rows (38 400 at the default 300 steps), so a seeded
# subset of this many rows stands in for a larger pool, which would otherwise be copied whole as float32
# (10.5 GB for ImageNet-1k's 1.28 M × 2048).
SELF_TRAINING_POOL = 65536
FIT_THREADS = min(8, os.cpu_count() or 1)


@contextlib.contextmanager
def fixed_threads(n: int = FIT_THREADS) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_start_head(kind: str, labeled: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                   unlabeled: torch.Tensor | None, weight_decay: float, steps: int, seed: int) -> nn.Linear:
    """`kind` ∈ FITTED. labeled float32[N, d], labels int64[N]; unlabeled float32[M, d] (fixmatch_la only).

    'ce' / 'la': (logit-adjusted) cross-entropy by L-BFGS; 'fixmatch_la': the LA head, then FixMatch-style
    self-training on the unlabeled features (docs/method.md §1.4).
    """
    with fixed_threads():
        head = fit_head(labeled, labels, num_classes, loss="ce" if kind == "ce" else "logit_adjusted",
                        weight_decay=weight_decay, max_iter=steps, seed=seed)
        if kind == "fixmatch_la":
            if unlabeled is None or len(unlabeled) == 0:
                raise ValueError("model.init_head=fixmatch_la needs a non-empty unlabeled split")
            head = self_train_head(head, labeled, labels, unlabeled, steps=steps, seed=seed)
    return head


def self_training_rows(pool, seed: int, limit: int = SELF_TRAINING_POOL) -> torch.Tensor:
    """The unlabeled rows self-training sees, float32[min(N, limit), d]: every row of `pool` (anything with
    len() and take(index)) in order when it has at most `limit`, else `limit` distinct rows drawn with
    `seed`, in increasing order."""
    n = len(pool)
    if n <= limit:
        return pool.take(torch.arange(n))
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return pool.take(pick.sort().values)


def choose_by_validation(candidates: dict[str, nn.Linear], features: torch.Tensor, labels: torch.Tensor,
                         metric: str, head_mask: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The candidate with the highest validation `metric` (a compute_metrics key; ties: the first listed) and
    every candidate's score. features float[V, d], labels int64[V], head_mask bool[K].

    Self-training usually lifts mean recall but can drop the rarest classes to zero recall, so which head
    scores better depends on the metric.
    """
    scores = {name: float(evaluate_head(head, features, labels, len(head_mask), head_mask=head_mask)[metric])
              for name, head in candidates.items()}
    return max(scores, key=lambda name: scores[name]), scores


def read_head(path: str | Path, dim: int, num_classes: int) -> nn.Linear:
    """A saved head: a state dict {weight, bias}, or a dict holding one under 'head' (our checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config key 'model.init_head': {str(path)!r} is neither one of {[*FITTED, AUTO]}, 'zeros' "
                         "nor an existing file")
    state = load_tensors(path, "head file")
    state = state.get("head", state) if isinstance(state, dict) else state
    head = nn.Linear(dim, num_classes)
    try:
        head.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"head file {path} does not fit a Linear({dim}, {num_classes}): {err}") from err
    return head


def zero_head(dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head
