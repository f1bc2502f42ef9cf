"""The SelMix gain matrix G (docs/method.md §3.2–§3.5) in O(K²d + K³) time and O(K² + Kd) memory.

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

Memory traffic: on a CPU a fresh K×K float64 buffer costs about one elementwise pass in page faults (glibc
maps blocks above 32 MiB anew for every allocation), so the elementwise steps run in place and the
products write into buffers that are no longer needed (D, then Γ); see docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from ._validate import all_finite, check_choice, check_finite, check_nonnegative, check_square
from .objectives import CLAMP_MIN, GAIN_VARIANTS

__all__ = ["PRIORS", "logit_derivative", "gain_matrix", "gemm_floor"]

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


def _logit_derivative(ch: torch.Tensor, Psi: torch.Tensor, prior: str) -> torch.Tensor:
    """D from the clamped float64 ``ch`` = Ĉ [K, K] (checked by the caller); one new K×K matrix."""
    m = Psi.to(device=ch.device, dtype=torch.float64) * ch
    rows = m.sum(dim=1)
    # w_k = K assumes a balanced validation prior (ρ_k = 1/K); 1/ρ_k is exact for any prior.
    w = ch.shape[0] if prior == "balanced" else 1.0 / ch.sum(dim=1)
    return m.addcmul_((w * rows).unsqueeze(1), ch, value=-1.0)


def logit_derivative(C: torch.Tensor, Psi: torch.Tensor, prior: str = "balanced") -> torch.Tensor:
    """D = ∂ψ/∂A [K, K] float64 (A = logits at the prototypes), on ``C``'s device.

    ``C`` [K, K] joint confusion (clamped at 1e-7 as Ĉ), ``Psi`` [K, K] = ∂ψ/∂C,
    ``prior``: "balanced" (w_k = K, the release) or "empirical" (w_k = 1/ρ_k with ρ = Ĉ's row sums).
    """
    _check_confusion_pair(C, Psi)
    check_choice(prior, "prior", PRIORS)
    return _logit_derivative(C.detach().to(torch.float64).clamp_min(CLAMP_MIN), Psi.detach(), prior)


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


def _neg_gemm(F: torch.Tensor, E: torch.Tensor, lam: float, a_buffer: torch.Tensor,
              out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sum for all K×K pairs with three GEMMs; returns (neg [K, K], bad_rows bool[K]).

    Shifts each row of ``F`` in place to a maximum of 0 (a, c ∈ (0, 1]: no overflow); the pair softmax, and
    so the blocked fallback, does not change under a per-row shift. ``a_buffer`` (contiguous K×K, F's dtype)
    is overwritten with A; ``out`` (likewise, or None: a new matrix) receives neg.
    """
    k = F.shape[0]
    F.sub_(F.max(dim=1, keepdim=True).values)
    a = torch.mul(F, lam, out=a_buffer).exp_()
    # one GEMM gives S = A Cᵀ and N2 = A (C∘E)ᵀ side by side, a second N1 = (A∘E) Cᵀ
    c_ce = torch.empty(2 * k, k, dtype=F.dtype, device=F.device)
    c = torch.mul(F, 1.0 - lam, out=c_ce[:k]).exp_()
    torch.mul(c, E, out=c_ce[k:])
    s_n2 = a @ c_ce.T
    s, n2 = s_n2[:, :k], s_n2[:, k:]
    neg = torch.mm(a.mul_(E), c.T, out=out)
    del a, c_ce
    neg.mul_(lam).add_(n2, alpha=1.0 - lam).div_(s)
    finfo = torch.finfo(F.dtype)
    # below this S, terms that matter may be subnormal (lost precision) or zero
    floor = finfo.tiny / finfo.eps * k
    bad = ~(s.amin(dim=1) >= floor)  # written so that a NaN (amin propagates it) also counts as bad
    if not all_finite(neg):
        bad |= ~torch.isfinite(neg).all(dim=1)
    return neg, bad


def _logits_and_e(
    z: torch.Tensor, w: torch.Tensor, d_mat: torch.Tensor, include_bias: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """E = Γ D [K, K] (Γ = Z Zᵀ, + 11ᵀ with the bias update) and F = Z Wᵀ [K, K] (no bias), in ``dtype``.

    For K ≤ d: Γ = Z Zᵀ and F = Z Wᵀ (2K²d), then Γ D (K³); returns Γ too (free once E is formed). For
    K > d the Gram matrix is never formed (None): E = Z (Zᵀ D) costs 2K²d < K²d + K³.
    """
    k, d = z.shape
    z, w = z.to(dtype), w.to(dtype)
    _check_products(z, w, dtype)
    logits = z @ w.T
    if k <= d:
        gram = z @ z.T
        if include_bias:
            gram.add_(1.0)  # a constant-1 feature carries the bias update
        e = gram @ d_mat
    else:
        gram, e = None, z @ (z.T @ d_mat)
        if include_bias:
            e += d_mat.sum(dim=0)  # (11ᵀ) D: every row is the column sums of D
    if not all_finite(e):
        raise ValueError(f"E = Z Zᵀ D overflows in {dtype}: prototypes or Ψ are too large")
    return e, logits, gram


def _check_products(z: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> None:
    """Z Zᵀ and Z Wᵀ cannot overflow: |⟨z_i, w_j⟩| ≤ ‖z_i‖‖w_j‖ (Cauchy–Schwarz, also for every partial sum),
    so bounding the row norms [K] spares a pass over the K×K products."""
    z_norm, w_norm = (torch.linalg.vector_norm(x.double(), dim=1).max() for x in (z, w))
    largest = float(torch.maximum(z_norm * z_norm, z_norm * w_norm)) * (1.0 + 1e-6)
    if not largest < torch.finfo(dtype).max:
        raise ValueError(f"Z Zᵀ or Z Wᵀ overflows in {dtype}: prototypes/weight are too large")


def _check_matrix(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point [K, d] tensor, got {shape}")


def _check_inputs(prototypes: object, weight: object, bias: object, C: object, Psi: object) -> None:
    _check_matrix(prototypes, "prototypes")
    k, d = prototypes.shape
    if k == 0:
        raise ValueError("prototypes is empty")
    check_finite(prototypes, "prototypes")
    _check_head(weight, bias, k, d)
    _check_confusion_pair(C, Psi, k)


def _check_head(weight: object, bias: object, k: int, d: int) -> None:
    """``weight`` a finite floating-point [K, d] tensor, ``bias`` None or a finite floating-point [K] one."""
    _check_matrix(weight, "weight")
    if weight.shape[0] != k:
        raise ValueError(f"weight has K={weight.shape[0]} rows but prototypes has K={k}")
    if weight.shape[1] != d:
        raise ValueError(f"weight has d={weight.shape[1]} but prototypes has d={d}")
    check_finite(weight, "weight")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (k,) or not bias.is_floating_point():
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a floating-point [{k}] tensor or None, got {shape}")
        check_finite(bias, "bias")


def _check_options(k: int, variant: str, prior: str, method: str, include_bias: bool, has_bias: bool,
                   mixup_mean: float, dtype: torch.dtype, block_size: int | None) -> tuple[float, int]:
    """Validated (λ̄, block size) of ``gain_matrix``'s options."""
    check_choice(variant, "variant", GAIN_VARIANTS)
    check_choice(prior, "prior", PRIORS)
    check_choice(method, "method", _METHODS)
    if include_bias and not has_bias:
        raise ValueError("include_bias=True needs a bias (the head has none)")
    lam = float(mixup_mean)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup_mean must be in [0, 1], got {mixup_mean}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if block_size is None:
        return lam, max(1, _BLOCK_ELEMENTS // (k * k))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return lam, block_size


def gemm_floor(k: int, d: int) -> tuple[int, int]:
    """How many K×K×K and K×d×K products (multiply-adds) one gain takes: (4, 2) for K ≤ d, (3, 3) above.

    K ≤ d: Z [Z; W]ᵀ is two K×d×K, E = Γ D one K×K×K, then A [C; C∘E]ᵀ two and (A∘E) Cᵀ one K×K×K.
    K > d: Z Wᵀ, Zᵀ D and Z (Zᵀ D) are three K×d×K, the pair softmax three K×K×K. Everything else is O(K²);
    the floor of a refresh in K×K×K units is therefore 4 + 2d/K (K ≤ d) or 3 + 3d/K (K > d).
    """
    return (4, 2) if k <= d else (3, 3)


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
    lam, block_size = _check_options(prototypes.shape[0], variant, prior, method, include_bias, bias is not None,
                                     mixup_mean, dtype, block_size)
    with torch.no_grad():
        ch = C.detach().to(device=weight.device, dtype=torch.float64).clamp_min(CLAMP_MIN)
        return _gain_from_clipped(prototypes, weight, bias, ch, Psi, variant=variant, include_bias=include_bias,
                                  prior=prior, lam=lam, dtype=dtype, block_size=block_size, method=method)


def _gain_from_clipped(prototypes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ch: torch.Tensor,
                       Psi: torch.Tensor, *, variant: str, include_bias: bool, prior: str, lam: float,
                       dtype: torch.dtype, block_size: int, method: str) -> torch.Tensor:
    """``gain_matrix`` on checked inputs and options, with ``ch`` = Ĉ float64 [K, K] on ``weight``'s device."""
    k = prototypes.shape[0]
    device = weight.device
    with torch.no_grad():
        d_mat = _logit_derivative(ch, Psi.detach(), prior).to(dtype)
        e, logits, gram = _logits_and_e(prototypes.detach().to(device), weight.detach(), d_mat, include_bias, dtype)
        if bias is not None:
            logits.add_(bias.detach().to(device=device, dtype=dtype))  # logits is this function's own matrix

        if method == "gemm":
            # D and Γ are spent once E exists: they hold A and the result (two fewer fresh K×K buffers)
            neg, bad = _neg_gemm(logits, e, lam, a_buffer=d_mat, out=gram)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten()
                neg[rows] = _neg_blocked(logits, e, rows, lam, block_size)
        else:
            neg = _neg_blocked(logits, e, torch.arange(k, device=device), lam, block_size)

        diag = e.diagonal().unsqueeze(1)
        if variant == "exact":
            # pos_ij = λ̄ E_ii + (1−λ̄) E_ji
            return neg.neg_().add_(e.T, alpha=1.0 - lam).add_(diag, alpha=lam)
        return neg.neg_().add_(diag)
