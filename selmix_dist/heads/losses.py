"""Loss functions of the baselines (all return the mean over the batch).

* logit-adjusted cross-entropy (Menon et al., ICLR 2021):  CE(a(x) + tau * log pi, y);
* the hybrid logit-adjusted cost-sensitive loss of Narasimhan & Menon (NeurIPS 2021), as used by CSST:
  for a gain matrix G[K, K] with positive diagonal, write G = M diag(G) (M = G diag(G)^-1, M_ii = 1) and
      loss(y, f) = - sum_i M[y, i] * log softmax(f - log diag(G))_i .
  With a diagonal G this is CE(f - log G_yy-style adjustment, y); with G_ii = 1/pi_i (balanced error) it is
  exactly the logit-adjusted loss with tau = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor,
                                 tau: float = 1.0) -> torch.Tensor:
    """logits float[B, K], labels int64[B], log_prior float[K] -> scalar mean CE(logits + tau log pi, y).
    Gradient w.r.t. logits: (softmax(logits + tau log pi) - onehot(y)) / B."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), labels)


def hybrid_cost_sensitive_loss(logits: torch.Tensor, labels: torch.Tensor,
                               gain: torch.Tensor) -> torch.Tensor:
    """logits float[B, K], labels int64[B], gain float[K, K] (nonnegative, positive diagonal) -> scalar.

    loss = mean_b  - sum_i M[y_b, i] log softmax(logits_b - log diag(G))_i,   M = G diag(G)^-1.
    """
    diag = torch.diagonal(gain)
    weights = (gain / diag.unsqueeze(0)).to(logits.dtype)          # M[y, i] = G[y, i] / G[i, i]
    log_probs = F.log_softmax(logits - torch.log(diag).to(logits.dtype), dim=1)
    return -(weights[labels] * log_probs).sum(dim=1).mean()
