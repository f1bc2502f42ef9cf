"""Post-hoc plug-in classifier for a confusion-matrix objective: per-class log-weights on a head's logits.

The plug-in rule predicts ``argmax_k (s_k(x) + β_k)`` where ``s`` are a trained head's logits and
``β_k = log g_k`` are tuned on the validation set for the objective ψ (docs/method.md §6). Because β is a bias
shift, the plug-in classifier of ``nn.Linear(W, b)`` is ``nn.Linear(W, b + β)``.

Tuning, deterministic and validation-only:

1. *Linearised ascent.* At the hard validation confusion matrix C(β) of the current β the objective's
   multipliers are updated and Ψ = ∂ψ/∂C is taken (the same Ψ the gain uses). The linearised metric
   ``Σ_ab Ψ_ab C̃_ab`` of the soft confusion matrix ``C̃_ab = (1/V) Σ_{x: y=a} softmax(s(x) + β)_b`` has the
   per-class direction

       d_j = (1/V) Σ_x p_j(x) (Ψ_{y(x) j} − Σ_b Ψ_{y(x) b} p_b(x)),     p = softmax(s + β),

   and β moves by ``η_t d / max|d|`` with ``η_t = step / sqrt(t + 1)`` (a normalised step: Ψ's scale differs by
   orders of magnitude between objectives and between refreshes of the same objective).
2. *Coverage auction* (per-class coverage objectives whose constraint the best β so far misses): the class with
   the fewest predictions is raised to an equal share of them, again and again, until every class has
   ⌈αV/K⌉ (``_raise_uncovered``).
3. *Coordinate polish.* For each class j in turn, β_j is set to the best of the values at which some validation
   prediction flips (the ``flip_points`` nearest ones on each side of the current β_j), judged on the hard
   metric; sweeps repeat until a sweep changes nothing or ``polish_sweeps`` is reached.

Every candidate β is judged by ``plugin_score``: for a constrained objective, a β that meets the constraint
beats every β that does not (those rank by their violation, for per-class coverage the total shortfall), then
the target metric; an objective without a named metric ranks by ψ(C). The best β seen is returned, so the
result is never worse on validation than β = 0 (the head itself).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ._validate import check_num_classes
from .confusion import joint_confusion
from .metrics import compute_metrics
from .objectives import Objective

__all__ = ["PluginResult", "constraint_violation", "coverage_floor", "fit_plugin", "plugin_score"]

# Rows of the [V, K] score matrix handled at once by the soft direction (bounded float64 memory at K = 8142).
_BLOCK_ENTRIES = 1 << 24
_HEAD_METRICS = {"min_head_tail_recall", "head_coverage", "tail_coverage"}


def _metrics(counts: torch.Tensor, objective: Objective, head: torch.Tensor | None) -> dict[str, float]:
    alpha = (objective.params or {}).get("alpha", 0.95)
    return compute_metrics(counts, head=head, coverage_alpha=alpha)


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


def _recall_metric(name: str, diag: torch.Tensor, rows: torch.Tensor, head: torch.Tensor | None) -> float:
    """One recall metric of compute_metrics from float64 diagonal and row sums [K] (its conventions: classes
    with no sample left out, H-/G-mean 0 when a recall is 0), in O(K) instead of compute_metrics' O(K²)."""
    present = rows > 0
    r = diag[present] / rows[present]
    if name == "mean_recall":
        return _mean(r)
    if name == "min_recall":
        return float(r.min()) if r.numel() else 0.0
    if name in ("h_mean", "g_mean"):
        if r.numel() == 0 or bool((r <= 0).any()):
            return 0.0
        return float(r.numel() / (1.0 / r).sum()) if name == "h_mean" else float(torch.exp(torch.log(r).mean()))
    if name == "min_head_tail_recall":
        recall = torch.where(present, diag / rows.clamp_min(1), torch.zeros_like(diag))
        groups = [recall[g & present] for g in (head, ~head)]
        means = [_mean(x) for x in groups if x.numel()]
        return min(means) if means else 0.0
    raise KeyError(name)


def _violation(objective: Objective, cols: torch.Tensor, head: torch.Tensor | None) -> float:
    """How far the objective's constraint is from holding, ≥ 0 (0: met or unconstrained), from float64 column sums
    [K]: per-class coverage, the total shortfall Σ_j max(0, α/K − cov_j); head/tail coverage, the larger shortfall
    of the head and tail mean coverages below α/K.

    The total, not compute_metrics' largest shortfall: at K = 200 several classes sit one validation image below
    the target at once, and raising one of them leaves the largest shortfall where it was, so a coordinate step
    could never be seen to help and the polish stopped one image short of the constraint."""
    names = objective.constraint_metrics
    if not names:
        return 0.0
    cov = cols / cols.sum()
    target = objective.params["alpha"] / objective.num_classes
    if "coverage_violation" in names:
        return float((target - cov).clamp_min(0).sum())
    return max(0.0, *(target - _mean(cov[g]) for g in (head, ~head)))


def constraint_violation(counts: torch.Tensor, objective: Objective, head: torch.Tensor | None) -> float:
    """How far int64 counts [K, K] are from meeting the objective's constraint, ≥ 0 (0: met, or none): the
    first key of ``plugin_score``, and what ranks a training run's best.pt before its metric does."""
    if not objective.constraint_metrics:
        return 0.0
    return _violation(objective, counts.to(torch.float64).sum(dim=0), head)


def plugin_score(counts: torch.Tensor, objective: Objective, head: torch.Tensor | None) -> tuple[float, float]:
    """(−violation, target) of int64 counts [K, K]: compare lexicographically, larger is better. The target is
    compute_metrics' value of the objective's metric, computed from the diagonal and the row and column sums
    alone (tested against compute_metrics)."""
    if not objective.target_metric:
        return 0.0, float(objective.psi(joint_confusion(counts)))
    c = counts.to(torch.float64)
    return _fast_score(c.diagonal(), c.sum(dim=1), c.sum(dim=0), objective, head)


def _fast_score(diag, rows, cols, objective: Objective, head) -> tuple[float, float]:
    return -_violation(objective, cols, head), _recall_metric(objective.target_metric, diag, rows, head)


@dataclass
class PluginResult:
    """``log_weights`` float64[K] (β = log g, the bias shift), the validation ``score`` (see ``plugin_score``)
    and ``metrics`` of the plug-in rule, and the head's own ``start_score``."""

    log_weights: torch.Tensor
    score: tuple[float, float]
    start_score: tuple[float, float]
    metrics: dict[str, float]

    @property
    def feasible(self) -> bool:
        return self.score[0] == 0.0


def _soft_direction(logits: torch.Tensor, beta: torch.Tensor, labels: torch.Tensor,
                    psi: torch.Tensor) -> torch.Tensor:
    """d float64[K] (module docstring), summed over row blocks of logits [V, K] in their dtype (a direction
    needs no float64: float32 logits halve the memory traffic of the ascent's one pass per iteration)."""
    v, k = logits.shape
    block = max(1, _BLOCK_ENTRIES // k)
    d = torch.zeros(k, dtype=torch.float64, device=logits.device)
    beta, psi = beta.to(logits.dtype), psi.to(logits.dtype)
    for start in range(0, v, block):
        p = torch.softmax(logits[start:start + block] + beta, dim=1)
        q = psi[labels[start:start + block]]                      # Ψ_{y(x), ·}
        q -= (q * p).sum(dim=1, keepdim=True)
        d += (q * p).sum(dim=0, dtype=torch.float64)
    return d / v


class _TopTwo:
    """The two best classes of every row of ``logits + beta`` [V, K], kept up to date as one β_j moves, so that a
    coordinate step costs O(V) plus the rows it touches instead of O(VK)."""

    def __init__(self, logits: torch.Tensor, beta: torch.Tensor) -> None:
        self.logits = logits
        self.values, self.classes = (logits + beta).topk(2, dim=1)

    def others(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Best score and class of every row over the classes other than j: float64[V], int64[V]."""
        first_is_j = self.classes[:, 0] == j
        pick = first_is_j.long().unsqueeze(1)
        return self.values.gather(1, pick).squeeze(1), self.classes.gather(1, pick).squeeze(1)

    def moved(self, j: int, beta: torch.Tensor) -> None:
        """β_j changed: recompute the rows whose top two held j or that j now enters."""
        rows = (self.classes == j).any(dim=1) | (self.logits[:, j] + beta[j] > self.values[:, 1])
        if bool(rows.any()):
            self.values[rows], self.classes[rows] = (self.logits[rows] + beta).topk(2, dim=1)


def _flip_points(threshold: torch.Tensor, beta_j: float, n: int) -> torch.Tensor:
    """Candidate β_j: the middles of the ``n`` nearest intervals between flip points on each side of the current
    β_j (a row predicts j iff β_j > threshold[row], float64[V]), and one step past the outermost flip point.
    Middles, not edges: an edge leaves no room for the next coordinate's move."""
    points = torch.unique(threshold)                        # sorted
    at = int(torch.searchsorted(points, torch.tensor(beta_j, dtype=points.dtype)))
    lo, hi = max(0, at - n - 1), min(len(points), at + n + 1)
    window = points[lo:hi]
    mids = (window[1:] + window[:-1]) / 2
    gap = 1.0 + float(points[-1] - points[0]) / max(1, len(points))
    ends = torch.tensor([float(points[0]) - gap, float(points[-1]) + gap], dtype=points.dtype)
    return torch.cat([mids, ends[[lo == 0, hi == len(points)]]])


def _raise_uncovered(logits: torch.Tensor, beta: torch.Tensor, need: int, max_raises: int) -> torch.Tensor:
    """β float64[K] after raising, one at a time, the class with the fewest validation predictions to an equal
    share of them (⌊V/K⌋ rows: the midpoint between that flip point and the next), until every class has ``need``
    or ``max_raises`` raises were made.

    An auction for the per-class coverage constraint: a raised class takes the rows nearest its boundary from
    whichever classes held them, and those with rows to spare lose nothing that counts. It reaches what the
    polish cannot: when many classes sit one image short, every single move that helps one of them costs
    another, and only a sequence of raises gets all of them over. The bid is the equal share, not ``need``: a
    class raised to exactly ``need`` falls short again at the next neighbour's raise: from an uncorrected K = 200
    head (the test's) 35-42 classes were still short after 25 600 raises, against none after about 1 400 with
    the share."""
    v, k = logits.shape
    beta = beta.clone()
    share = v // k
    if need > share:                       # more than V rows in all: no β can give it
        return beta
    top = _TopTwo(logits, beta)
    counts = torch.bincount(top.classes[:, 0], minlength=k)
    for _ in range(max_raises):
        j = int(counts.argmin())
        if int(counts[j]) >= need:
            break
        other_value, _ = top.others(j)
        threshold = other_value - logits[:, j]
        if share < v:   # the share-th and next flip points: a partial sort, not a sort of all V
            low = torch.topk(threshold, share + 1, largest=False).values
            beta[j] = float(low[share - 1] + low[share]) / 2
        else:
            beta[j] = float(threshold.max()) + 1.0
        top.moved(j, beta)
        counts = torch.bincount(top.classes[:, 0], minlength=k)
    return beta - beta.mean()


def _coverage_need(alpha: float, v: int, k: int) -> int:
    """Validation predictions every class needs for cov_j ≥ α/K: ⌈αV/K⌉ (the 1e-9 absorbs αV/K's rounding)."""
    return math.ceil(alpha * v / k - 1e-9)


def coverage_floor(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """β float64[K], mean 0: the bias shift that gives every class at least ⌈αV/K⌉ of the predictions
    ``argmax(logits + β)`` over validation logits float[V, K], by the coverage auction (``_raise_uncovered``).

    Zero where every class already has them, so applying it twice changes nothing. At most 16 K raises: a class
    still short after them stays short (the caller's metrics show it). The floor must be reachable:
    ⌈αV/K⌉ ≤ ⌊V/K⌋ (an equal share), which α < 1 gives whenever V is a multiple of K."""
    if logits.dim() != 2 or not bool(torch.isfinite(logits).all()):
        raise ValueError(f"logits must be a finite [V, K] tensor, got shape {tuple(logits.shape)}")
    v, k = logits.shape
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
    need = _coverage_need(alpha, v, k)
    if need > v // k:
        raise ValueError(f"coverage floor α/K = {alpha:g}/{k} asks {need} of {v} validation predictions per class, "
                         f"more than an equal share ({v // k}): lower alpha or balance the validation split")
    return _raise_uncovered(logits.to(torch.float64), torch.zeros(k, dtype=torch.float64, device=logits.device),
                            need, 16 * k)


def fit_plugin(logits: torch.Tensor, labels: torch.Tensor, objective: Objective, *, head: torch.Tensor | None = None,
               iterations: int = 50, step: float = 0.5, polish_sweeps: int = 2,
               flip_points: int = 16) -> PluginResult:
    """Tune β float64[K] on validation logits float[V, K] with labels int64[V] for ``objective``.

    ``head`` bool[K] (head classes) is needed for the head/tail metrics. The objective is copied, so its
    multipliers are not changed. Deterministic: the same inputs give the same β."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [V, K], got shape {tuple(logits.shape)}")
    v, k = logits.shape
    check_num_classes(k, "logits.shape[1]")
    if k != objective.num_classes:
        raise ValueError(f"logits have K={k} classes, the objective K={objective.num_classes}")
    if labels.shape != (v,):
        raise ValueError(f"labels must have shape [{v}], got {tuple(labels.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or infinite values")
    if v == 0:
        raise ValueError("the validation set is empty")
    labels = labels.to(device=logits.device, dtype=torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}], got range [{int(labels.min())}, {int(labels.max())}]")
    if head is None and _HEAD_METRICS & {objective.target_metric, *objective.constraint_metrics}:
        raise ValueError(f"objective {objective.name!r} needs the head mask (bool[{k}]) to score its metrics")
    objective = copy.deepcopy(objective)
    soft_logits = logits.to(torch.float32)
    logits = logits.to(torch.float64)
    row_offset = labels * k

    def counts_of_preds(preds: torch.Tensor) -> torch.Tensor:   # confusion_counts without re-validating
        return torch.bincount(row_offset + preds, minlength=k * k).reshape(k, k)

    def counts_of(beta: torch.Tensor) -> torch.Tensor:
        return counts_of_preds((logits + beta).argmax(dim=1))

    rows = torch.bincount(labels, minlength=k).to(torch.float64)

    def score_of(preds: torch.Tensor) -> tuple[float, float]:   # O(V + K): no [K, K] matrix
        if not objective.target_metric:
            return plugin_score(counts_of_preds(preds), objective, head)
        diag = torch.bincount(labels[preds == labels], minlength=k).to(torch.float64)
        return _fast_score(diag, rows, torch.bincount(preds, minlength=k).to(torch.float64), objective, head)

    beta = torch.zeros(k, dtype=torch.float64, device=logits.device)
    counts = counts_of(beta)
    best_beta, best = beta.clone(), plugin_score(counts, objective, head)
    start_score = best
    for t in range(iterations):
        C = joint_confusion(counts)
        objective.update_multipliers(C)
        psi = objective.gradient(C).to(logits.device)
        d = _soft_direction(soft_logits, beta, labels, psi)
        scale = float(d.abs().max())
        if not math.isfinite(scale) or scale == 0.0:
            break
        beta = beta + (step / math.sqrt(t + 1)) * d / scale
        beta -= beta.mean()                                   # the rule is invariant to a common shift
        preds = (logits + beta).argmax(dim=1)
        counts, score = counts_of_preds(preds), score_of(preds)
        if score > best:
            best_beta, best = beta.clone(), score
    if best[0] < 0 and "coverage_violation" in objective.constraint_metrics and k > 1:
        beta = _raise_uncovered(logits, best_beta, _coverage_need(objective.params["alpha"], v, k), 16 * k)
        score = score_of((logits + beta).argmax(dim=1))
        if score > best:
            best_beta, best = beta, score
    beta = best_beta.clone()
    top = _TopTwo(logits, beta) if polish_sweeps and k > 1 else None
    for _ in range(polish_sweeps if top is not None else 0):
        changed = False
        for j in range(k):
            # Only β_j moves: a row predicts j iff s_j + β_j beats its best other class, else that class.
            other_value, other_class = top.others(j)
            threshold = other_value - logits[:, j]
            for candidate in _flip_points(threshold, float(beta[j]), flip_points).tolist():
                preds = torch.where(candidate > threshold, j, other_class)
                score = score_of(preds)
                if score > best:
                    best, changed = score, True
                    beta = beta.clone()
                    beta[j] = candidate
            top.moved(j, beta)
        if not changed:
            break
    best_beta = beta - beta.mean()
    metrics = _metrics(counts_of(best_beta), objective, head)
    return PluginResult(best_beta, best, start_score, metrics)
