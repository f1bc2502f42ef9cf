"""Test-side helpers around frozen backbones: a head made outside the library, the only-the-head-trains
check, and the backbone's own classifier for sanity checks of loaded weights."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from selmix_dist.core.rng import derive_seed, generator
from selmix_dist.features.backbones import FrozenBackbone


@torch.no_grad()
def imagenet_logits(backbone: FrozenBackbone, x: torch.Tensor) -> torch.Tensor:
    """Logits float[B, C] of the timm model's own (e.g. ImageNet) classifier for normalised x float[B, 3, H, W]."""
    if backbone.model.num_classes == 0:
        raise ValueError(f"backbone {backbone.name!r} has no classifier (it was moved out by new_head)")
    return backbone.model(x)


def new_head(backbone: FrozenBackbone, num_classes: int, init: str = "zeros", seed: int = 0) -> nn.Linear:
    """A trainable head, a plain `nn.Linear(num_features, num_classes)` (float32, CPU).

    init: "zeros" (weight and bias 0), "default" (nn.Linear's Kaiming-uniform init drawn from
    `generator(seed, "head")`), or "timm" (the model's own classifier re-created by
    `reset_classifier(num_classes)` and moved out of the backbone, which then has no classifier).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    d = backbone.num_features
    if init == "zeros":
        head = nn.Linear(d, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head
    if init == "default":
        head = nn.Linear(d, num_classes)
        g = generator(seed, "head")
        # Same distribution as nn.Linear.reset_parameters, but from our own generator.
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(d)
        nn.init.uniform_(head.bias, -bound, bound, generator=g)
        return head
    if init == "timm":
        model = backbone.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "head") % 2**63)
            model.reset_classifier(num_classes)
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{backbone.name!r}'s classifier is a {type(head).__name__}, not nn.Linear; "
                "use init='zeros' or 'default'"
            )
        model.reset_classifier(0)  # the backbone keeps no trainable classifier
        head.requires_grad_(True)
        return head.float().cpu()
    raise ValueError(f"unknown head init {init!r}; expected 'zeros', 'default' or 'timm'")


def assert_only_head_trainable(modules: nn.Module | Iterable[nn.Module], head: nn.Module) -> None:
    """ValueError unless the parameters with requires_grad across `modules` are exactly `head`'s."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    head_ids = {id(p) for p in head.parameters()}
    frozen_head = [n for n, p in head.named_parameters() if not p.requires_grad]
    stray: list[str] = []
    for i, m in enumerate(mods):
        stray += [f"modules[{i}].{n}" for n, p in m.named_parameters()
                  if p.requires_grad and id(p) not in head_ids]
    if stray or frozen_head or not head_ids:
        raise ValueError(
            "exactly the head's parameters must be trainable; "
            f"trainable outside the head: {stray[:10]}{' ...' if len(stray) > 10 else ''}; "
            f"frozen head parameters: {frozen_head}; head parameter count: {len(head_ids)}"
        )
