"""The SelMix gain matrix G (method spec §3.2–§3.5b) in O(K²d + K³) time and O(K² + Kd) memory.

Notation: K classes, d feature dimension, prototypes Z [K, d] (validation class means), head W [K, d],
b [K], prototype logits F = Z Wᵀ + b, validation joint confusion C, Ψ = ∂ψ/∂C.

* ``logit_derivative``: D = ∂ψ/∂A through the softmax-at-prototype model of C,
  D = Ψ∘Ĉ − w ∘ Ĉ∘((Ψ∘Ĉ)1)1ᵀ, with w_k = K (balanced prior, the release) or 1/ρ_k (empirical prior).
* ``gain_matrix``: G_ij = first-order change of ψ per unit SGD step on the mixup of (label i, partner j)
  with mean weight λ̄: with Γ = Z Zᵀ (+ 11ᵀ when the bias update is modelled), E = Γ D,
  p_ij = softmax(λ̄ F_i + (1−λ̄) F_j),

      G_ij = pos_ij − Σ_l p_ij,l (λ̄ E_il + (1−λ̄) E_jl),
      pos_ij = λ̄ E_ii + (1−λ̄) E_ji   (variant "exact": the true mixup step)
      pos_ij = E_ii                   (variant "official": the release's pure-prototype positive term;
                                       the release's Ψ is ``Objective.gradient(C, variant="official")``).

Cost: O(K²d + K³) time, O(K² + Kd) memory (no K³ or K⁴ tensor). F, Γ and E take 2K²d + K³
multiply-adds for K ≤ d (E = (Z Zᵀ) D) and 3K²d for K > d (E = Z (Zᵀ D), Γ never formed). The sum over l
is three K×K×K matrix products, because the pair softmax factorises as
exp(λ̄F_il + (1−λ̄)F_jl) = a_il c_jl; rows where the denominator S = A Cᵀ underflows (logit gaps of
hundreds in float64, far fewer in float32) are recomputed with the blocked log-sum-exp form.
"""

from __future__ import annotations

import torch

from ._validate import all_finite, check_choice, check_finite, check_nonnegative, check_square
from .objectives import CLAMP_MIN, GAIN_VARIANTS

__all__ = ["PRIORS", "logit_derivative", "gain_matrix"]

PRIORS = ("balanced", "empirical")
_METHODS = ("gemm", "blocked")
# elements per B×K×K temporary of the blocked path (32 MiB in float64)
_BLOCK_ELEMENTS = 1 << 22


def _check_confusion_pair(C: object, Psi: object, num_classes: int | None = None) -> None:
    C = check_square(C, "C", num_classes)
    check_finite(C, "C")
    check_nonnegative(C, "C")
    Psi = check_square(Psi, "Psi")
    if Psi.shape != C.shape:
        raise ValueError(f"Psi has K={Psi.shape[0]} classes but C has K={C.shape[0]}")
    check_finite(Psi, "Psi")


def _logit_derivative(C: torch.Tensor, Psi: torch.Tensor, prior: str) -> torch.Tensor:
    ch = C.to(torch.float64).clamp_min(CLAMP_MIN)
    m = Psi.to(device=ch.device, dtype=torch.float64) * ch
    rows = m.sum(dim=1)
    # w_k = K assumes a balanced validation prior (ρ_k = 1/K); 1/ρ_k is exact for any prior.
    w = ch.shape[0] if prior == "balanced" else 1.0 / ch.sum(dim=1)
    return m - (w * rows).unsqueeze(1) * ch


def logit_derivative(C: torch.Tensor, Psi: torch.Tensor, prior: str = "balanced") -> torch.Tensor:
    """D = ∂ψ/∂A [K, K] float64 (A = logits at the prototypes), on ``C``'s device.

    ``C`` [K, K] joint confusion (clamped at 1e-7 as Ĉ), ``Psi`` [K, K] = ∂ψ/∂C,
    ``prior``: "balanced" (w_k = K, the release) or "empirical" (w_k = 1/ρ_k with ρ = Ĉ's row sums).
    """
    _check_confusion_pair(C, Psi)
    check_choice(prior, "prior", PRIORS)
    return _logit_derivative(C, Psi, prior)


def _neg_blocked(
    F: torch.Tensor, E: torch.Tensor, rows: torch.Tensor, lam: float, block: int
) -> torch.Tensor:
    """Σ_l p_ij,l (λ̄E_il + (1−λ̄)E_jl) for label rows ``rows`` [R] → [R, K], by blocks of label rows.

    Stable log-sum-exp softmax of the B×K×K pair logits; memory O(block · K²).
    """
    out = torch.empty(rows.numel(), F.shape[0], dtype=F.dtype, device=F.device)
    for start in range(0, rows.numel(), block):
        idx = rows[start : start + block]
        # [B, K(j), K(l)] pair logits → pair softmax over l (max-subtracted inside softmax)
        p = torch.softmax((lam * F[idx]).unsqueeze(1) + (1.0 - lam) * F.unsqueeze(0), dim=-1)
        out[start : start + idx.numel()] = lam * torch.einsum("bjl,bl->bj", p, E[idx]) + (
            1.0 - lam
        ) * torch.einsum("bjl,jl->bj", p, E)
    return out


def _neg_gemm(F: torch.Tensor, E: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sum for all K×K pairs with three GEMMs; returns (neg [K, K], bad_rows bool[K])."""
    k = F.shape[0]
    shifted = F - F.max(dim=1, keepdim=True).values  # row max 0: a, c ∈ (0, 1], no overflow
    a = torch.exp(shifted * lam)
    # one GEMM gives S = A Cᵀ and N2 = A (C∘E)ᵀ side by side, a second N1 = (A∘E) Cᵀ
    c_ce = torch.empty(2 * k, k, dtype=F.dtype, device=F.device)
    c = torch.exp(shifted.mul_(1.0 - lam), out=c_ce[:k])
    torch.mul(c, E, out=c_ce[k:])
    s_n2 = a @ c_ce.T
    s, n2 = s_n2[:, :k], s_n2[:, k:]
    n1 = (a * E) @ c.T
    neg = n1.mul_(lam).add_(n2, alpha=1.0 - lam).div_(s)
    finfo = torch.finfo(F.dtype)
    # below this S, terms that matter may be subnormal (lost precision) or zero
    floor = finfo.tiny / finfo.eps * k
    bad = (~(s >= floor)).any(dim=1)  # written so that a NaN also counts as bad
    if not all_finite(neg):
        bad |= ~torch.isfinite(neg).all(dim=1)
    return neg, bad


def _logits_and_e(
    z: torch.Tensor, w: torch.Tensor, d_mat: torch.Tensor, include_bias: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """E = Γ D [K, K] (Γ = Z Zᵀ, + 11ᵀ with the bias update) and F = Z Wᵀ [K, K] (no bias), in ``dtype``.

    For K ≤ d: one GEMM Z [Z; W]ᵀ gives Γ and F (2K²d), then Γ D (K³). For K > d the Gram matrix is
    never formed: E = Z (Zᵀ D) costs 2K²d < K²d + K³.
    """
    k, d = z.shape
    if k <= d:
        zw = torch.cat([z, w]).to(dtype)  # one cast, one GEMM
        zzw = zw[:k] @ zw.T
        del zw
        _check_products(zzw, dtype)
        gram, logits = zzw[:, :k], zzw[:, k:]
        if include_bias:
            gram.add_(1.0)  # a constant-1 feature carries the bias update
        return gram @ d_mat, logits
    z = z.to(dtype)
    logits = z @ w.to(dtype).T
    e = z @ (z.T @ d_mat)
    _check_products(logits, dtype)
    _check_products(e, dtype)
    if include_bias:
        e += d_mat.sum(dim=0)  # (11ᵀ) D: every row is the column sums of D
    return e, logits


def _check_products(x: torch.Tensor, dtype: torch.dtype) -> None:
    if not all_finite(x):
        raise ValueError(f"Z Zᵀ or Z Wᵀ overflows in {dtype}: prototypes/weight are too large")


def _check_inputs(prototypes: object, weight: object, bias: object, C: object, Psi: object) -> None:
    for name, x in (("prototypes", prototypes), ("weight", weight)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating-point [K, d] tensor, got {shape}")
    k, d = prototypes.shape
    if k == 0:
        raise ValueError("prototypes is empty")
    if weight.shape[0] != k:
        raise ValueError(f"weight has K={weight.shape[0]} rows but prototypes has K={k}")
    if weight.shape[1] != d:
        raise ValueError(f"weight has d={weight.shape[1]} but prototypes has d={d}")
    check_finite(prototypes, "prototypes")
    check_finite(weight, "weight")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (k,) or not bias.is_floating_point():
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a floating-point [{k}] tensor or None, got {shape}")
        check_finite(bias, "bias")
    _check_confusion_pair(C, Psi, k)


def gain_matrix(
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    C: torch.Tensor,
    Psi: torch.Tensor,
    *,
    variant: str = "exact",
    include_bias: bool = False,
    prior: str = "balanced",
    mixup_mean: float = 0.8,
    dtype: torch.dtype = torch.float64,
    block_size: int | None = None,
    method: str = "gemm",
) -> torch.Tensor:
    """Gain matrix G [K, K] (rows: label class i, columns: partner class j) in ``dtype``.

    Args:
        prototypes: Z [K, d] validation class-mean features.
        weight, bias: the head, W [K, d] and b [K] (or None for a head without bias).
        C: [K, K] joint validation confusion; Psi: [K, K] ∂ψ/∂C (``Objective.gradient``).
        variant: "exact" (mixed prototype in both terms, default) or "official" (release, pos = E_ii).
        include_bias: model the bias update too (Γ + 11ᵀ); needs a bias.
        prior: "balanced" or "empirical" (see ``logit_derivative``).
        mixup_mean: λ̄, the mean mixup weight of the labeled sample (0.8 for λ ~ U(0.6, 1)).
        dtype: computation dtype; float64 keeps the factorised softmax from underflowing.
        block_size: label rows per block of the log-sum-exp path (default: ~4M elements per block).
        method: "gemm" (three matrix products, log-sum-exp fallback for underflowing rows) or "blocked"
            (log-sum-exp for every row; slower, reference).

    Computed on ``weight``'s device; other inputs are moved there. Memory O(K² + Kd + block_size·K²).
    """
    _check_inputs(prototypes, weight, bias, C, Psi)
    check_choice(variant, "variant", GAIN_VARIANTS)
    check_choice(prior, "prior", PRIORS)
    check_choice(method, "method", _METHODS)
    if include_bias and bias is None:
        raise ValueError("include_bias=True needs a bias (the head has none)")
    lam = float(mixup_mean)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup_mean must be in [0, 1], got {mixup_mean}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    k = prototypes.shape[0]
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // (k * k))
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")

    device = weight.device
    with torch.no_grad():
        d_mat = _logit_derivative(C.detach().to(device), Psi.detach().to(device), prior).to(dtype)
        e, logits = _logits_and_e(prototypes.detach().to(device), weight.detach(), d_mat, include_bias, dtype)
        del d_mat
        if bias is not None:
            logits = logits + bias.detach().to(device=device, dtype=dtype)

        if method == "gemm":
            neg, bad = _neg_gemm(logits, e, lam)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten()
                neg[rows] = _neg_blocked(logits, e, rows, lam, block_size)
        else:
            neg = _neg_blocked(logits, e, torch.arange(k, device=device), lam, block_size)

        diag = e.diagonal().unsqueeze(1)
        if variant == "exact":
            # pos_ij = λ̄ E_ii + (1−λ̄) E_ji
            return torch.add(lam * diag, e.T, alpha=1.0 - lam).sub_(neg)
        return neg.neg_().add_(diag)
