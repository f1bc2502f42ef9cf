from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from selmix_dist.core.confusion import confusion_counts
from selmix_dist.core.gain import gain_matrix, gemm_floor, logit_derivative
from selmix_dist.core.objectives import OBJECTIVES, build_objective
from selmix_dist.core.refresh import RefreshSettings, selmix_refresh

LAM = 0.8


def _head_mask(k: int) -> torch.Tensor:
    head = torch.zeros(k, dtype=torch.bool)
    head[: max(1, (9 * k) // 10)] = True
    return head


def _setup(k: int, d: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, d, generator=g, dtype=torch.float64)
    w = scale * torch.randn(k, d, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(k, generator=g, dtype=torch.float64)
    c = torch.rand(k, k, generator=g, dtype=torch.float64) + 2 * torch.eye(k, dtype=torch.float64)
    c[:, 0] += 1.0  # uneven columns: the coverage constraints are active
    c *= torch.rand(k, 1, generator=g, dtype=torch.float64) + 0.3  # unbalanced rows: the priors differ
    c[k - 1, 0] = 1e-9  # an entry below the 1e-7 clamp
    return z, w, b, c / c.sum()


# ---- brute force, straight from the formulas of method spec §3.2–§3.4 ------------------------------
def _brute_force_gain(z, w, b, C, Psi, *, variant: str, include_bias: bool, prior: str) -> list[list[float]]:
    k, d = len(z), len(z[0])
    ch = [[max(C[i][j], 1e-7) for j in range(k)] for i in range(k)]
    rho = [sum(row) for row in ch]
    weight = [k if prior == "balanced" else 1.0 / rho[i] for i in range(k)]

    # D_ql = Σ_ij Ψ_ij ∂C_ij/∂A_ql with ∂C_ij/∂A_kl = δ_ik (Ĉ_ij δ_jl − w_i Ĉ_ij Ĉ_il)
    D = [[0.0] * k for _ in range(k)]
    for i, j, l in itertools.product(range(k), repeat=3):
        D[i][l] += Psi[i][j] * (ch[i][j] * (j == l) - weight[i] * ch[i][j] * ch[i][l])

    def dot(u, v):
        return sum(u[t] * v[t] for t in range(d)) + (1.0 if include_bias else 0.0)

    G = [[0.0] * k for _ in range(k)]
    for i, j in itertools.product(range(k), repeat=2):
        mixed = [LAM * z[i][t] + (1 - LAM) * z[j][t] for t in range(d)]
        logits = [sum(w[l][t] * mixed[t] for t in range(d)) + b[l] for l in range(k)]
        top = max(logits)
        expo = [math.exp(x - top) for x in logits]
        p = [e / sum(expo) for e in expo]
        for q in range(k):
            pull = dot(mixed, z[q]) if variant == "exact" else dot(z[i], z[q])
            for l in range(k):
                # R_ijql: change of logit l at prototype q per unit step of CE(mixed, label i)
                R = (l == i) * pull - p[l] * dot(mixed, z[q])
                G[i][j] += D[q][l] * R
    return G


@pytest.mark.parametrize("k", [2, 3, 7])
def test_vectorised_gain_equals_brute_force(k: int) -> None:
    z, w, b, C = _setup(k, d=4, seed=k)
    lists = [x.tolist() for x in (z, w, b, C)]
    checked = 0
    for name in sorted(OBJECTIVES):
        obj = build_objective(name, k, head=_head_mask(k))
        obj.update_multipliers(C)
        psi = obj.gradient(C)
        for variant, include_bias, prior in itertools.product(
            ("exact", "official"), (False, True), ("balanced", "empirical")
        ):
            got = gain_matrix(z, w, b, C, psi, variant=variant, include_bias=include_bias, prior=prior)
            ref = torch.tensor(
                _brute_force_gain(
                    *lists, psi.tolist(), variant=variant, include_bias=include_bias, prior=prior
                ),
                dtype=torch.float64,
            )
            scale = float(ref.abs().max())
            assert scale > 0
            assert float((got - ref).abs().max()) <= 1e-9 * scale, (name, variant, include_bias, prior)
            checked += 1
    assert checked == len(OBJECTIVES) * 8


@pytest.mark.parametrize("k", [3, 5])
def test_refresh_gain_equals_brute_force(k: int) -> None:
    """selmix_refresh, from raw validation statistics, against the brute-force G of its own C and prototypes."""
    g = torch.Generator().manual_seed(k)
    labels = torch.arange(k).repeat_interleave(6)
    preds = torch.where(torch.rand(len(labels), generator=g) < 0.5, labels, torch.randint(0, k, labels.shape,
                                                                                         generator=g))
    feats = torch.randn(len(labels), 4, generator=g, dtype=torch.float64)
    counts = confusion_counts(labels, preds, k)
    sums = torch.zeros(k, 4, dtype=torch.float64).index_add_(0, labels, feats)
    w, b = torch.randn(k, 4, generator=g), torch.randn(k, generator=g)
    C = (counts.double() / counts.sum()).tolist()
    z = [[x / 6 for x in row] for row in sums.tolist()]  # 6 validation samples per class
    for name, variant, include_bias, prior in itertools.product(
        ("min_recall", "h_mean_min_head_tail_coverage"), ("exact", "official"), (False, True),
        ("balanced", "empirical"),
    ):
        settings = RefreshSettings(gain_variant=variant, include_bias=include_bias, prior=prior, mixup_min=0.6)
        out = selmix_refresh(counts, sums, w, b, build_objective(name, k, head=_head_mask(k)), settings)
        ref = torch.tensor(_brute_force_gain(z, w.double().tolist(), b.double().tolist(), C, out.psi.tolist(),
                                             variant=variant, include_bias=include_bias, prior=prior),
                           dtype=torch.float64)
        assert float((out.gain - ref).abs().max()) <= 1e-9 * float(ref.abs().max()), (name, variant)


# ---- finite differences along a real SGD step of the head --------------------------------------------
def _soft_confusion(z, w, b) -> torch.Tensor:
    """C_ij = (1/K) softmax(W z_i + b)_j: the model of C that the gain linearises, exactly."""
    return torch.softmax(z @ w.T + b, dim=1) / z.shape[0]


@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("d", [3, 6])  # K > d: E = Z (Zᵀ D); K ≤ d: E = (Z Zᵀ) D
def test_exact_gain_matches_finite_difference_of_an_sgd_step(include_bias: bool, d: int) -> None:
    k, h = 4, 1e-4
    z, w, b, _ = _setup(k, d=d, seed=11)
    C = _soft_confusion(z, w, b)
    assert float(C.min()) > 1e-7  # the clamp is inactive, so the model is exact
    for name in sorted(OBJECTIVES):
        obj = build_objective(name, k, head=_head_mask(k))
        obj.update_multipliers(C)
        psi = obj.gradient(C)
        fd = torch.empty(k, k, dtype=torch.float64)
        for i, j in itertools.product(range(k), repeat=2):
            wv, bv = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            mixed = LAM * z[i] + (1 - LAM) * z[j]
            loss = F.cross_entropy((wv @ mixed + bv).unsqueeze(0), torch.tensor([i]))
            gw, gb = torch.autograd.grad(loss, (wv, bv))
            step_b = -gb if include_bias else torch.zeros_like(gb)
            up = obj.psi(_soft_confusion(z, w - h * gw, b + h * step_b))
            down = obj.psi(_soft_confusion(z, w + h * gw, b - h * step_b))
            fd[i, j] = (up - down) / (2 * h)
        exact = gain_matrix(z, w, b, C, psi, variant="exact", include_bias=include_bias)
        scale = float(fd.abs().max())
        assert float((exact - fd).abs().max()) <= 1e-5 * scale, name
        official = gain_matrix(z, w, b, C, psi, variant="official", include_bias=include_bias)
        assert float((official - fd).abs().max()) > 1e-2 * scale, name  # the release's term is off


# ---- three-GEMM path vs the blocked log-sum-exp path --------------------------------------------------
@pytest.mark.parametrize("variant", ["exact", "official"])
def test_gemm_path_equals_blocked_path(variant: str) -> None:
    k = 40
    z, w, b, C = _setup(k, d=16, seed=5)
    psi = build_objective("g_mean", k).gradient(C)
    kw = {"variant": variant, "include_bias": True, "prior": "empirical"}
    gemm = gain_matrix(z, w, b, C, psi, **kw)
    for block in (1, 7, k):
        blocked = gain_matrix(z, w, b, C, psi, method="blocked", block_size=block, **kw)
        torch.testing.assert_close(gemm, blocked, rtol=1e-10, atol=1e-12 * float(blocked.abs().max()))


def test_underflowing_rows_fall_back_to_log_sum_exp() -> None:
    k = 12
    z, w, b, C = _setup(k, d=8, seed=3, scale=400.0)  # logit gaps of thousands
    psi = build_objective("mean_recall", k).gradient(C)
    # the naive factorised denominator S = A Cᵀ underflows to 0 for some pairs
    logits = z @ w.T + b
    shifted = logits - logits.max(dim=1, keepdim=True).values
    s = torch.exp(LAM * shifted) @ torch.exp((1 - LAM) * shifted).T
    assert bool((s == 0).any())
    gemm = gain_matrix(z, w, b, C, psi)
    blocked = gain_matrix(z, w, b, C, psi, method="blocked")
    assert bool(torch.isfinite(gemm).all())
    torch.testing.assert_close(gemm, blocked, rtol=1e-9, atol=1e-12 * float(blocked.abs().max()))
    # float32 underflows much sooner; the fallback keeps it finite and close to float64
    g32 = gain_matrix(z.float(), w.float(), b.float(), C, psi, dtype=torch.float32)
    assert g32.dtype == torch.float32 and bool(torch.isfinite(g32).all())


def test_gain_on_float32_inputs_and_moderate_logits_is_close_in_float32() -> None:
    z, w, b, C = _setup(20, d=8, seed=9)
    psi = build_objective("h_mean", 20).gradient(C)
    g64 = gain_matrix(z, w, b, C, psi)
    g32 = gain_matrix(z.float(), w.float(), b.float(), C, psi, dtype=torch.float32)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-4 * float(g64.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gain_on_cuda_matches_cpu() -> None:
    z, w, b, C = _setup(30, d=16, seed=4)
    psi = build_objective("g_mean", 30).gradient(C)
    cpu = gain_matrix(z, w, b, C, psi)
    gpu = gain_matrix(z.cuda(), w.cuda(), b.cuda(), C, psi)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)


def test_logit_derivative_row_constants_cancel_with_empirical_prior() -> None:
    _, _, _, C = _setup(5, d=2, seed=2)
    row_constant = torch.arange(5, dtype=torch.float64).unsqueeze(1).expand(5, 5)
    assert float(logit_derivative(C, row_constant, prior="empirical").abs().max()) < 1e-15
    # the balanced prior assumes ρ = 1/K, which this C violates
    assert float(logit_derivative(C, row_constant, prior="balanced").abs().max()) > 1e-3


# ---- bad input --------------------------------------------------------------------------------------
def _bad(**changes):
    z, w, b, C = _setup(4, d=3, seed=0)
    args = {"prototypes": z, "weight": w, "bias": b, "C": C, "Psi": torch.eye(4, dtype=torch.float64)}
    args.update(changes)
    return args


def _nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[1] = float("nan")
    return x


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"C": torch.rand(4, 3, dtype=torch.float64)}, "C must be a square"),
        ({"C": -torch.rand(4, 4, dtype=torch.float64)}, "C has negative"),
        ({"C": torch.rand(5, 5, dtype=torch.float64)}, "C has K=5 classes but 4"),
        ({"Psi": torch.eye(5, dtype=torch.float64)}, "Psi has K=5"),
        ({"weight": torch.randn(5, 3, dtype=torch.float64)}, "weight has K=5 rows but prototypes has K=4"),
        ({"weight": torch.randn(4, 2, dtype=torch.float64)}, "weight has d=2 but prototypes has d=3"),
        ({"bias": torch.zeros(3, dtype=torch.float64)}, "bias must be"),
        ({"prototypes": _nan(_setup(4, 3, 0)[0])}, "prototypes contains NaN"),
        ({"weight": _nan(_setup(4, 3, 0)[1]) * float("inf")}, "weight contains NaN or inf"),
        ({"bias": _nan(_setup(4, 3, 0)[2])}, "bias contains NaN"),
        ({"C": _nan(_setup(4, 3, 0)[3])}, "C contains NaN"),
        ({"Psi": _nan(torch.eye(4, dtype=torch.float64))}, "Psi contains NaN"),
    ],
)
def test_gain_matrix_rejects_bad_input(changes, match) -> None:
    with pytest.raises(ValueError, match=match):
        gain_matrix(**_bad(**changes))


def test_gain_matrix_rejects_bad_options() -> None:
    args = _bad()
    for kw, match in (
        ({"variant": "code"}, "variant"),
        ({"prior": "uniform"}, "prior"),
        ({"mixup_mean": 1.5}, "mixup_mean"),
        ({"method": "fast"}, "method"),
        ({"block_size": 0}, "block_size"),
    ):
        with pytest.raises(ValueError, match=match):
            gain_matrix(**args, **kw)
    with pytest.raises(ValueError, match="include_bias=True needs a bias"):
        gain_matrix(**{**args, "bias": None}, include_bias=True)


@pytest.mark.parametrize("k,d", [(12, 20), (12, 12), (12, 5)])
def test_gemm_floor_counts_the_products_of_a_refresh(k: int, d: int) -> None:
    """The floor of tools/bench_gain.py: the refresh's matrix products, counted by torch's FLOP counter
    (2 flops per multiply-add), are gemm_floor's K×K×K and K×d×K products and nothing else."""
    from torch.utils.flop_counter import FlopCounterMode

    z, w, b, _ = _setup(k, d, seed=1)
    counts = confusion_counts(torch.arange(k).repeat(5), torch.arange(5 * k) % k, k)
    for variant in ("exact", "official"):
        with FlopCounterMode(display=False) as counter:
            selmix_refresh(counts, z * 5, w, b, build_objective("g_mean", k), RefreshSettings(gain_variant=variant))
        n_kkk, n_kdk = gemm_floor(k, d)
        assert counter.get_total_flops() == 2 * (n_kkk * k**3 + n_kdk * k * k * d)
    assert gemm_floor(k, d) == ((4, 2) if k <= d else (3, 3))
