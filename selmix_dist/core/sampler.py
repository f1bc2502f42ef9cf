"""Class-pair sampler: draw (label class i, partner class j) ~ P, then a uniform member of each class.

Memory O(N + K²): per-class buckets are one argsort plus offsets, and P is kept as one flat float64 CDF
over the K² pairs (``torch.multinomial`` is limited to 2^24 categories; K = 8142 needs 66M). A draw is a
pure function of (seed, rank, step, P).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._validate import check_finite, check_nonnegative, check_num_classes, check_square
from .distribution import restrict_support
from .rng import generator

__all__ = ["PairBatch", "PairSampler"]


class PairBatch(NamedTuple):
    """Indices into the labeled / partner sets and their classes, all int64 [B]."""

    label_index: torch.Tensor
    partner_index: torch.Tensor
    label_class: torch.Tensor
    partner_class: torch.Tensor


class _Buckets:
    """Indices of a dataset grouped by class: members of class c are ``order[offsets[c]:offsets[c+1]]``."""

    def __init__(self, classes: torch.Tensor, num_classes: int) -> None:
        valid = torch.nonzero(classes >= 0).flatten()  # class −1 = no (pseudo-)label: never drawn
        kept = classes[valid]
        self.order = valid[torch.argsort(kept, stable=True)]
        self.counts = torch.bincount(kept, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, dim=0) - self.counts

    def draw(self, cls: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A uniform member of class ``cls[b]`` for each b, from uniforms ``u`` [B] in [0, 1)."""
        n = self.counts[cls]
        pick = torch.minimum((u * n).to(torch.int64), n - 1)  # min(): guards u*n rounding up to n
        return self.order[self.offsets[cls] + pick]


def _check_classes(x: object, name: str, num_classes: int) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
    x = x.to(device="cpu", dtype=torch.int64)
    bad = (x < -1) | (x >= num_classes)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{name}[{first}] = {int(x[first])} is outside [0, {num_classes}) (−1 = unlabeled)")
    return x


class PairSampler:
    """Samples mixup pairs from a class-pair distribution P.

    Args:
        label_classes: int64 [N1] class of every labeled sample (the dominant one, label i).
        partner_classes: int64 [N2] (pseudo-)class of every partner sample (class j); for supervised
            SelMix the same tensor as ``label_classes``. Entries −1 (no class) are never drawn.
        num_classes: K.

    ``set_distribution(P)`` drops rows of label classes and columns of partner classes with no sample
    (renormalising) and builds the CDF; ``sample(batch_size, seed=, rank=, step=)`` draws a ``PairBatch``.
    """

    def __init__(self, label_classes: torch.Tensor, partner_classes: torch.Tensor, num_classes: int) -> None:
        self.num_classes = check_num_classes(num_classes)
        self._labels = _Buckets(_check_classes(label_classes, "label_classes", num_classes), num_classes)
        self._partners = _Buckets(
            _check_classes(partner_classes, "partner_classes", num_classes), num_classes
        )
        self._cdf: torch.Tensor | None = None
        self.probabilities: torch.Tensor | None = None

    @property
    def label_counts(self) -> torch.Tensor:
        """int64 [K] labeled samples per class."""
        return self._labels.counts

    @property
    def partner_counts(self) -> torch.Tensor:
        """int64 [K] partner samples per class."""
        return self._partners.counts

    def set_distribution(self, P: torch.Tensor) -> None:
        """Use P [K, K] (non-negative; need not be normalised). ValueError if no pair can be drawn."""
        P = check_square(P, "P", self.num_classes)
        check_finite(P, "P")
        check_nonnegative(P, "P")
        try:
            p = restrict_support(P.detach().cpu(), self._labels.counts > 0, self._partners.counts > 0)
        except ValueError as err:
            raise ValueError(f"PairSampler: {err} (classes with no sample cannot be drawn)") from err
        self.probabilities = p
        self._cdf = torch.cumsum(p.flatten(), dim=0)
        # the last pair with mass is where the (non-decreasing) CDF first reaches its total
        self._last = int(torch.searchsorted(self._cdf, self._cdf[-1:]))

    def sample(self, batch_size: int, *, seed: int, rank: int, step: int) -> PairBatch:
        """``batch_size`` pairs drawn with ``generator(seed, rank, step)`` (same inputs → same batch)."""
        if self._cdf is None:
            raise RuntimeError("PairSampler.sample called before set_distribution")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        gen = generator(seed, rank, step)
        u = torch.rand(3, batch_size, generator=gen, dtype=torch.float64)
        # right=True never selects a zero-mass pair (its CDF value equals its predecessor's); scaling by the
        # CDF total and clamping to the last pair with mass covers total ≠ 1 and rounding at the top end
        flat = torch.searchsorted(self._cdf, u[0] * self._cdf[-1], right=True).clamp_(max=self._last)
        label_class = torch.div(flat, self.num_classes, rounding_mode="floor")
        partner_class = flat - label_class * self.num_classes
        return PairBatch(
            label_index=self._labels.draw(label_class, u[1]),
            partner_index=self._partners.draw(partner_class, u[2]),
            label_class=label_class,
            partner_class=partner_class,
        )
