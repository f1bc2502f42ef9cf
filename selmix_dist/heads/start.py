"""The head SelMix starts from (`model.init_head`): fitted on the labeled features, self-trained, or read.

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

from selmix_dist.heads.fit import fit_head
from selmix_dist.heads.selftrain import self_train_head

FITTED = ("la", "ce", "fixmatch_la")
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
    self-training on the unlabeled features (method doc §1.4).
    """
    with fixed_threads():
        head = fit_head(labeled, labels, num_classes, loss="ce" if kind == "ce" else "logit_adjusted",
                        weight_decay=weight_decay, max_iter=steps, seed=seed)
        if kind == "fixmatch_la":
            if unlabeled is None or len(unlabeled) == 0:
                raise ValueError("model.init_head=fixmatch_la needs a non-empty unlabeled split")
            head = self_train_head(head, labeled, labels, unlabeled, steps=steps, seed=seed)
    return head


def read_head(path: str | Path, dim: int, num_classes: int) -> nn.Linear:
    """A saved head: a state dict {weight, bias}, or a dict holding one under 'head' (our checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config key 'model.init_head': {str(path)!r} is neither one of {list(FITTED)}, 'zeros' "
                         "nor an existing file")
    state = torch.load(path, map_location="cpu", weights_only=True)
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
