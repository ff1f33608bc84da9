"""Contrastive loss on cosine similarities (Hadsell, Chopra, LeCun, CVPR 2006, in the similarity form
used by the MMSI / DDTAS code, ``losses/Contrastive.py``; spec ddtas.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.losses.base import MetricLoss, is_pos_neg, pair_weights, upcast
from ddtas_lightning.miners.selection import PairSelection


class ContrastiveLoss(MetricLoss):
    """``L = (1/B) [ sum_{(i,p) in P} w_ip relu(pos_margin - S_ip) + sum_{(i,n) in N} w_in relu(S_in - lambda) ]``

    Sums over the selected pairs, divided by the number of anchors B (anchors without pairs count in
    B). ``threshold`` lambda = the negative margin (0.5); ``pos_margin`` = 1.0 makes the positive term
    ``1 - S`` for every positive, as in the code. A (2,) threshold is (pos_margin, lambda), i.e. it
    replaces ``pos_margin`` too; a per-anchor threshold ((B,) or (B, 1)) is each row's lambda
    (``pos_margin`` stays), like the 0-d one.

    Choice made here: the code writes the negative term as ``sum_{S_n > lambda} S_n`` (and the
    positive term ``sum_{S_p < 0.9} (1 - S_p)``); ``relu(S_n - lambda)`` has the same gradient w.r.t.
    the embeddings but is continuous in lambda, so a meta-learned threshold gets a non-zero gradient
    (``-#active / B``), where the code's form has zero derivative w.r.t. lambda almost everywhere.
    ``weights``: (B, M), multiplying each pair's term. fp16/bf16 are computed in float32.
    """

    def __init__(self, pos_margin: float = 1.0, threshold: float = 0.5) -> None:
        super().__init__(threshold)
        self.pos_margin = float(pos_margin)

    def forward(
        self,
        sim: Tensor,
        selection: PairSelection,
        threshold: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        s = upcast(sim)
        if is_pos_neg(threshold):
            pos_margin, lam = self.resolve_threshold(s, threshold)
        else:
            _, lam = self.resolve_threshold(s, threshold)
            pos_margin = self.pos_margin
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        pos_terms = torch.relu(pos_margin - s)
        neg_terms = torch.relu(s - lam)
        w = pair_weights(weights, s)
        if w is not None:
            pos_terms = pos_terms * w
            neg_terms = neg_terms * w
        total = torch.where(selection.pos_mask, pos_terms, zero).sum()
        total = total + torch.where(selection.neg_mask, neg_terms, zero).sum()
        return total / s.shape[0]
