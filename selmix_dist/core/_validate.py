"""Boundary checks shared by the core modules; each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import torch

__all__ = [
    "all_finite",
    "check_square",
    "check_finite",
    "check_nonnegative",
    "check_num_classes",
    "check_bool_mask",
    "check_choice",
]


def check_num_classes(num_classes: object, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name} must be a positive int, got {num_classes!r}")
    return num_classes


def check_square(x: object, name: str, num_classes: int | None = None) -> torch.Tensor:
    """``x`` must be a 2-D square tensor (of side ``num_classes`` when given)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square [K, K] matrix, got shape {tuple(x.shape)}")
    if num_classes is not None and x.shape[0] != num_classes:
        raise ValueError(f"{name} has K={x.shape[0]} classes but {num_classes} were expected")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """True if no entry of ``x`` is NaN or ±inf."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    x = x.detach()
    # fast path: a NaN/inf entry makes the sum non-finite, so a finite sum proves every entry finite
    # (torch.isfinite(x).all() is ~10x slower); only a non-finite sum (possibly a plain overflow) needs
    # the exact elementwise test
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_nonnegative(x: torch.Tensor, name: str) -> torch.Tensor:
    """Call after ``check_finite`` (a NaN entry is not detected here)."""
    if x.numel() and bool(x.detach().amin() < 0):
        raise ValueError(f"{name} has negative entries")
    return x


def check_bool_mask(mask: object, name: str, num_classes: int) -> torch.Tensor:
    """A bool[K] tensor (integer 0/1 tensors are accepted and converted)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor of shape [{num_classes}], got {type(mask).__name__}")
    if mask.shape != (num_classes,):
        raise ValueError(f"{name} must have shape [{num_classes}], got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be a bool mask")
        mask = mask.bool()
    return mask


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
