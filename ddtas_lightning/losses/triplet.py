"""Triplet margin loss (Weinberger & Saul 2009; Schroff et al., FaceNet, CVPR 2015), reduced like
pytorch-metric-learning's ``TripletMarginLoss`` (``AvgNonZeroReducer``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.losses.base import MetricLoss, is_pos_neg, upcast
from ddtas_lightning.miners.selection import DISTANCES, PairSelection, distance_from_dots, enumerate_triplets


class TripletMarginLoss(MetricLoss):
    """``l_t = w_t relu(d(a,p) - d(a,n) + margin)``, ``L = sum_t l_t / #{t : relu(...) > 0}`` (0 if none).

    ``distance``: ``cosine`` (``1 - S``) or ``euclidean`` (``sqrt(2 - 2S)``, the L2 distance of the
    normalised embeddings, with a NaN-free gradient at duplicates); ``squared=True`` uses
    ``2 - 2S`` (the squared L2 distance, the NSPA author's Keras loss). With ``selection.self_gram`` (set by
    the triplet miners for a batch against itself) the distances are those of raw (un-normalised)
    embeddings, the squared norms read off the diagonal of S: ``S_aa + S_bb - 2 S_ab`` (and its root). ``threshold`` is the margin
    (default 0.2). A (2,) threshold (m_pos, m_neg) is read as the margin split into a pull and a push
    part: ``relu((d(a,p) + m_pos) - (d(a,n) - m_neg))``, i.e. margin = m_pos + m_neg. A per-anchor
    threshold ((B,) or (B, 1)) gives each triplet the margin of its anchor row a.

    Triplets: ``selection.triplets`` when the miner produced them, else every (a, p, n) with
    ``pos_mask[a, p]`` and ``neg_mask[a, n]`` (lexicographic order). ``weights``: optional (T,), one
    per triplet in that order; the divisor counts the triplets with a positive hinge regardless of
    the weights. fp16/bf16 are computed in float32.
    """

    def __init__(self, threshold: float = 0.2, distance: str = "euclidean", squared: bool = False) -> None:
        super().__init__(threshold)
        check_choice("loss.distance", distance, DISTANCES)
        if squared and distance != "euclidean":
            raise ConfigError(f"loss.squared=true needs loss.distance=euclidean, got loss.distance={distance}")
        self.distance = distance
        self.squared = bool(squared)

    def pair_distance(self, s: Tensor, sq_a: Tensor | None = None, sq_b: Tensor | None = None) -> Tensor:
        """Distance of pairs from their dot products (and squared norms, for raw embeddings)."""
        return distance_from_dots(s, self.distance, squared=self.squared, sq_norm_a=sq_a, sq_norm_b=sq_b)

    def forward(
        self,
        sim: Tensor,
        selection: PairSelection,
        threshold: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        s = upcast(sim)
        m_pos, m_neg = self.resolve_threshold(s, threshold)
        margin = m_pos + m_neg if is_pos_neg(threshold) else m_pos
        if selection.triplets is not None:
            a, p, n = selection.triplets
        else:
            a, p, n = enumerate_triplets(selection.pos_mask, selection.neg_mask)
        if margin.ndim:  # per anchor: the (B, 1) column, one margin per triplet from its anchor
            margin = margin[a, 0]
        if selection.self_gram:
            sq = s.diagonal()  # raw embeddings: ||e_i||^2 = S_ii, with its gradient
            d_ap = self.pair_distance(s[a, p], sq[a], sq[p])
            d_an = self.pair_distance(s[a, n], sq[a], sq[n])
        else:  # unit vectors
            d_ap, d_an = self.pair_distance(s[a, p]), self.pair_distance(s[a, n])
        losses = torch.relu(d_ap - d_an + margin)
        num_active = (losses > 0).sum()
        if weights is not None:
            if weights.shape != losses.shape:
                raise ValueError(
                    f"triplet weights must have shape (T,) = {tuple(losses.shape)}, got {tuple(weights.shape)}"
                )
            losses = losses * weights.to(device=s.device, dtype=s.dtype)
        return losses.sum() / num_active.clamp(min=1).to(s.dtype)
