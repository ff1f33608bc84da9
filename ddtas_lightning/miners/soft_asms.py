"""A smooth relaxation of ASMS (spec ``docs/papers/ddtas.md`` §1.1) so that its margin m can receive a
(meta-)gradient. Pure torch.

Hard ASMS keeps positive j of anchor i iff ``S_ij < maxN_i + gamma_pos`` and negative j iff
``S_ij > minP_i - gamma_neg``, with ``gamma_pos = m``, ``gamma_neg = m / 10``. The relaxation
replaces each step function by a sigmoid of temperature T:

    w_pos_ij = sigmoid((maxN_i + gamma_pos - S_ij) / T)   on P_i
    w_neg_ij = sigmoid((S_ij - minP_i + gamma_neg) / T)   on N_i

(0 elsewhere). ``detach_sim=True``: minP_i / maxN_i and S are taken as constants, as the hard masks
are, and the only new derivative is the one with respect to m; ``False``: the weights are a smooth
function of S too (what a forward-mode tangent through the training run must see, since their values
move with theta). As ``T -> 0`` the weights tend to the hard masks
(to 1/2 exactly on a tie). The weights are meant to multiply each pair's loss term.
"""

from __future__ import annotations

import torch
from torch import Tensor


def soft_asms_weights(sim: Tensor, pos: Tensor, neg: Tensor, margin: Tensor | float,
                      temperature: float, detach_sim: bool = True) -> tuple[Tensor, Tensor]:
    """``(w_pos, w_neg)``, each (B, M) in [0, 1], zero outside ``pos`` / ``neg``; differentiable in
    ``margin`` (a tensor), and in ``sim`` unless ``detach_sim``. Anchors without positives (negatives) give zero negative (positive)
    weights, as the hard miner then has no threshold for them."""
    if not temperature > 0:
        raise ValueError(f"miner.temperature must be > 0, got {temperature}")
    s = sim.detach() if detach_sim else sim
    margin = torch.as_tensor(margin, dtype=s.dtype, device=s.device)
    big = torch.finfo(s.dtype).max
    min_pos = torch.where(pos, s, torch.full_like(s, big)).min(dim=1, keepdim=True).values
    max_neg = torch.where(neg, s, torch.full_like(s, -big)).max(dim=1, keepdim=True).values
    has_pos, has_neg = pos.any(1, keepdim=True), neg.any(1, keepdim=True)
    min_pos = torch.where(has_pos, min_pos, torch.zeros_like(min_pos))
    max_neg = torch.where(has_neg, max_neg, torch.zeros_like(max_neg))
    w_pos = torch.sigmoid((max_neg + margin - s) / temperature) * (pos & has_neg)
    w_neg = torch.sigmoid((s - min_pos + margin / 10) / temperature) * (neg & has_pos)
    return w_pos, w_neg


__all__ = ["soft_asms_weights"]
