"""Lambda-free retrieval objectives, used as meta objectives of the learned-threshold policies
(``threshold_policy.meta_objective``): they score the retrieval ranking itself, so the meta loss does
not need a fixed lambda_0 of its own (issue 13). Pure torch.

Both take the similarity matrix of one batch scored against itself (``S = E E^T``, B x B) and its
labels; query i ranks every other item (self excluded by index). Queries without a positive are left
out; with none at all the result is an exact zero that still carries a graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masks(sim: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    n = sim.shape[0]
    if sim.shape != (n, n) or labels.shape != (n,):
        raise ValueError(f"expected a square similarity matrix and one label per row, got {tuple(sim.shape)} "
                         f"and {tuple(labels.shape)}")
    other = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    pos = (labels[:, None] == labels[None, :]) & other
    return pos, other


def smooth_ap_loss(sim: Tensor, labels: Tensor, temperature: float = 0.01) -> Tensor:
    """``1 - mean_i AP~_i`` (Smooth-AP, Brown, Xie, Kalogeiton, Zisserman, ECCV 2020).

    For query i and positive j: ``R(i, j) = 1 + sum_{k != i, j} sigma((S_ik - S_ij) / tau)`` (its
    smoothed rank among all items), ``R+(i, j) = 1 + sum_{k in P_i, k != j} sigma((S_ik - S_ij) / tau)``
    (among the positives), ``AP~_i = (1 / |P_i|) sum_{j in P_i} R+(i, j) / R(i, j)``. As tau -> 0 the
    sigmoid becomes the step function and AP~ the exact average precision. Memory O(B^3).
    """
    pos, other = _masks(sim, labels)
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return sim.sum() * 0.0
    diff = sim[:, None, :] - sim[:, :, None]  # [i, j, k] = S_ik - S_ij
    k_ok = other[:, None, :] & ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)[None]  # k != i, j
    sig = torch.sigmoid(diff / temperature) * k_ok
    rank_all = 1 + sig.sum(-1)
    rank_pos = 1 + (sig * pos[:, None, :]).sum(-1)
    ap = ((rank_pos / rank_all) * pos).sum(1)[has_pos] / pos.sum(1)[has_pos]
    return 1 - ap.mean()


def nca_loss(sim: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Softmax neighbourhood objective (NCA, Goldberger et al. 2004, as a metric-learning loss):
    ``-mean_i log( sum_{j in P_i} exp(S_ij / tau) / sum_{j != i} exp(S_ij / tau) )``, the negative log
    probability that query i's soft nearest neighbour is a positive."""
    pos, other = _masks(sim, labels)
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return sim.sum() * 0.0
    logits = sim / temperature
    neg_inf = torch.finfo(sim.dtype).min
    log_pos = torch.logsumexp(logits.masked_fill(~pos, neg_inf), dim=1)
    log_all = torch.logsumexp(logits.masked_fill(~other, neg_inf), dim=1)
    return -(log_pos - log_all)[has_pos].mean()


OBJECTIVES = {"smooth_ap": smooth_ap_loss, "nca": nca_loss}

__all__ = ["OBJECTIVES", "nca_loss", "smooth_ap_loss"]
