"""``gain_variant="official"`` against a brute-force transcription of the release's refresh.

The reference below is written from the method spec (/work/shared/docs/selmix-method.md §2.1–§2.4,
§3.1–§3.4, §3.6) in plain loops over numpy scalars, without the library: the release clips the joint
confusion matrix once, ``Ĉ = clip(C, 1e-7, 1e4)``, and computes the multipliers from Ĉ as well (recalls
``Ĉ_ii / Σ_j Ĉ_ij`` in the min-recall updates, unnormalised column sums ``Σ_i Ĉ_ij`` as coverages). The
validation counts have many zero entries, so Ĉ ≠ C and a multiplier computed from the raw C is off by up to
~1e-3 relative (more than the 1e-6 tolerance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selmix_dist.core import OBJECTIVES, RefreshSettings, build_objective, head_tail_masks, selmix_refresh

LAM = 0.8  # λ̄ = (0.6 + 1) / 2
OMEGA, ALPHA, TAU, LAMBDA_MAX = 50.0, 0.95, 0.01, 100.0  # the release's fine-tuning configs (§4.5)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def _release_multipliers(name: str, ch: np.ndarray) -> dict[str, list[float]]:
    """§2.3 on the clipped matrix: per-class λ (spread over i < 0.9K for head/tail) and the head/tail pair."""
    k = len(ch)
    n_head = int(0.9 * k)  # the means run over [:int(0.9K)]
    recall = [ch[i][i] / sum(ch[i][j] for j in range(k)) for i in range(k)]
    cov = [sum(ch[i][j] for i in range(k)) for j in range(k)]  # unnormalised column sums of Ĉ

    def spread(lam_h: float, lam_t: float) -> list[float]:
        return [lam_h / (0.9 * k) if i < 0.9 * k else lam_t / (0.1 * k) for i in range(k)]

    def closed_form(value: float) -> float:
        return max(0.0, LAMBDA_MAX * (1.0 - math.exp(-(ALPHA / k - value) / TAU)))

    def head_tail_mean(x: list[float]) -> list[float]:
        return [sum(x[:n_head]) / n_head, sum(x[n_head:]) / (k - n_head)]

    if name == "min_recall":
        return {"lambda": _softmax([-OMEGA * r for r in recall])}
    if name == "min_head_tail_recall":
        pair = _softmax([-OMEGA * m for m in head_tail_mean(recall)])
        return {"pair": pair, "lambda": spread(*pair)}
    if "head_tail_coverage" in name:
        pair = [closed_form(m) for m in head_tail_mean(cov)]
        return {"pair": pair, "lambda": spread(*pair)}
    if "coverage" in name:
        return {"lambda": [closed_form(c) for c in cov]}
    return {}


def _release_psi(name: str, C: np.ndarray, ch: np.ndarray, mult: dict[str, list[float]]) -> list[list[float]]:
    """§2.4: Ψ, including the coverage term and its normaliser."""
    k = len(C)
    rho = [sum(ch[i][j] for j in range(k)) for i in range(k)]
    raw_r = [C[i][i] / sum(C[i][j] for j in range(k)) for i in range(k)]
    clipped_r = [ch[i][i] / rho[i] for i in range(k)]
    if name.startswith("mean_recall"):
        psi = [[float(i == j) for j in range(k)] for i in range(k)]
    elif name in ("min_recall", "min_head_tail_recall"):
        psi = [[k * mult["lambda"][i] * (i == j) for j in range(k)] for i in range(k)]
    elif name == "g_mean":
        gm = math.exp(sum(math.log(r) for r in raw_r) / k) if min(raw_r) > 0 else 0.0
        psi = [[gm / k * ((i == j) / ch[i][i] - 1 / rho[i]) for j in range(k)] for i in range(k)]
    else:  # H-means: HM of the raw matrix, of the clipped one for the head/tail coverage variant
        r = clipped_r if name == "h_mean_min_head_tail_coverage" else raw_r
        hm = k / sum(1 / x for x in r) if min(r) > 0 else 0.0
        psi = [[hm**2 / k * ((i == j) * rho[i] / ch[i][i] ** 2 - 1 / ch[i][i]) for j in range(k)] for i in range(k)]
    if "coverage" in name:
        lam = mult["lambda"]
        if name == "mean_recall_min_head_tail_coverage":
            norm = 1 + max(mult["pair"])
        else:
            norm = 1 + max(lam)
        psi = [[(psi[i][j] + lam[j]) / norm for j in range(k)] for i in range(k)]
    return psi


def _release_gain(z: np.ndarray, w: np.ndarray, b: np.ndarray, ch: np.ndarray, psi: list[list[float]]):
    """§3.2–§3.4, the release's G_ij = E_ii − Σ_l p_ij,l (λ̄ E_il + (1−λ̄) E_jl), E = Z Zᵀ D."""
    k, d = z.shape
    D = [[0.0] * k for _ in range(k)]
    for q in range(k):
        row = sum(psi[q][j] * ch[q][j] for j in range(k))
        for l in range(k):
            D[q][l] = psi[q][l] * ch[q][l] - k * ch[q][l] * row
    gram = [[sum(z[a][t] * z[q][t] for t in range(d)) for q in range(k)] for a in range(k)]
    E = [[sum(gram[a][q] * D[q][l] for q in range(k)) for l in range(k)] for a in range(k)]
    F = [[sum(z[a][t] * w[l][t] for t in range(d)) + b[l] for l in range(k)] for a in range(k)]
    G = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            p = _softmax([LAM * F[i][l] + (1 - LAM) * F[j][l] for l in range(k)])
            G[i][j] = E[i][i] - sum(p[l] * (LAM * E[i][l] + (1 - LAM) * E[j][l]) for l in range(k))
    return G


def _release_distribution(G: list[list[float]], temperature: float, eps: float) -> list[list[float]]:
    """§3.6: softmax over all K² entries, masked to G > 0, + ε, renormalised (uniform if none is positive)."""
    k = len(G)
    flat = [g for row in G for g in row]
    if max(flat) <= 0:
        return [[1.0 / k**2] * k for _ in range(k)]
    sigma = _softmax([g / temperature for g in flat])
    p = [s * (g > 0) + eps for s, g in zip(sigma, flat, strict=True)]
    return [[p[i * k + j] / sum(p) for j in range(k)] for i in range(k)]


def _case(k: int, seed: int, d: int = 6):
    """Counts with many zeros (Ĉ ≠ C), unbalanced rows, class 0 over-predicted (coverage binds); Z, W, b."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(k, k)) * (rng.random((k, k)) < 0.4) + 6 * np.eye(k, dtype=np.int64)
    counts[:, 0] += 4
    counts *= rng.integers(1, 4, size=(k, 1))
    z = rng.normal(size=(k, d)) + 0.5
    w = rng.normal(size=(k, d))
    b = 0.3 * rng.normal(size=k)
    return counts, z, w, b


@pytest.mark.parametrize("k", [5, 9, 10, 20])  # 0.9K = 4.5, 8.1 (the λ spread covers one class more), 9, 18
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_refresh_is_the_release_on_a_clipped_matrix(k: int, seed: int) -> None:
    counts, z, w, b = _case(k, seed)
    C = counts / counts.sum()
    ch = np.clip(C, 1e-7, 1e4)
    assert (C < 1e-7).sum() >= k  # the clip changes C
    head, _ = head_tail_masks(torch.arange(k, 0, -1), head_fraction=0.9)  # index-sorted: head = [:int(0.9K)]
    support = counts.sum(axis=1, keepdims=True)
    settings = RefreshSettings(gain_variant="official", temperature=0.1)
    for name in sorted(OBJECTIVES):
        obj = build_objective(name, k, head=head, head_fraction=0.9)
        out = selmix_refresh(torch.from_numpy(counts), torch.from_numpy(z * support), torch.from_numpy(w),
                             torch.from_numpy(b), obj, settings)
        mult = _release_multipliers(name, ch)
        ours = obj.multipliers()
        if "pair" in mult:
            got = [float(ours["lambda_head"]), float(ours["lambda_tail"])]
            assert got == pytest.approx(mult["pair"], rel=1e-12, abs=1e-300), name
        elif mult:
            assert ours["lambda"].tolist() == pytest.approx(mult["lambda"], rel=1e-12, abs=1e-300), name
        G = np.array(_release_gain(z, w, b, ch, _release_psi(name, C, ch, mult)))
        scale = np.abs(G).max()
        assert scale > 0, name
        np.testing.assert_allclose(out.gain.numpy(), G, rtol=0, atol=1e-6 * scale, err_msg=name)
        eps = 1e-10 if name == "mean_recall" else 1e-8  # §3.6: MeanRecall uses ε = 1e-10
        P = np.array(_release_distribution(G.tolist(), 0.1, eps))
        np.testing.assert_allclose(out.distribution.numpy(), P, rtol=1e-6, atol=1e-6 * eps, err_msg=name)


def test_official_head_tail_recall_ignores_beta() -> None:
    """§2.3: the release's head/tail multipliers are always softmax(−ω [r̄_H, r̄_T]); the exact variant keeps β."""
    counts, _, _, _ = _case(10, seed=4)
    C = torch.from_numpy(counts / counts.sum())
    head, _ = head_tail_masks(torch.arange(10, 0, -1))
    memoryless = build_objective("min_head_tail_recall", 10, head=head)
    damped = build_objective("min_head_tail_recall", 10, head=head, beta=1.0)
    for _ in range(2):
        memoryless.update_multipliers(C, variant="official")
        damped.update_multipliers(C, variant="official")
    def pair(obj) -> list[float]:
        return [float(obj.multipliers()[key]) for key in ("lambda_head", "lambda_tail")]

    assert pair(damped) == pytest.approx(pair(memoryless), rel=1e-15)
    damped.update_multipliers(C)  # exact: λ ← λ^β exp(−ω r̄) from the last λ, so it moves on
    assert abs(pair(damped)[1] - pair(memoryless)[1]) > 1e-3 * pair(memoryless)[1]
