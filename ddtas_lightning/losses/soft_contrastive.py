"""Soft contrastive loss of the DDTAS code (``losses/SoftCon.py``; Jiang et al., ACM TOMM 2024;
spec ddtas.md §3): a mean-softplus ("binomial") form of the MS loss, used with (AT-)ASMS mining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ddtas_lightning.config.validation import as_float
from ddtas_lightning.losses.base import MetricLoss, pair_weights, upcast
from ddtas_lightning.miners.selection import PairSelection


def mean_softplus_loss(
    s: Tensor,
    selection: PairSelection,
    lam_pos: Tensor,
    lam_neg: Tensor,
    scale_pos: float,
    scale_neg: float,
    coef_pos: float,
    coef_neg: float,
    weights: Tensor | None = None,
    neg_shift: Tensor | float = 0.0,
) -> Tensor:
    """``(1/B) sum_{i valid} [ coef_pos * mean_{p in P_i} w softplus(-scale_pos (S_ip - lam_pos))
                              + coef_neg * mean_{n in N_i} w softplus( scale_neg (S_in + shift - lam_neg)) ]``.

    Valid anchors have at least one selected positive and one selected negative; the others are
    skipped but still count in B. The means divide by the number of selected pairs (not by the sum of
    the weights). ``lam_pos`` / ``lam_neg``: 0-d, or (B, 1) columns (one lambda per anchor row).
    """
    pos, neg = selection.pos_mask, selection.neg_mask
    pos_terms = F.softplus(-scale_pos * (s - lam_pos))
    neg_terms = F.softplus(scale_neg * (s + neg_shift - lam_neg))
    if weights is not None:
        pos_terms = pos_terms * weights
        neg_terms = neg_terms * weights
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    n_pos = pos.sum(1)
    n_neg = neg.sum(1)
    pos_mean = torch.where(pos, pos_terms, zero).sum(1) / n_pos.clamp(min=1).to(s.dtype)
    neg_mean = torch.where(neg, neg_terms, zero).sum(1) / n_neg.clamp(min=1).to(s.dtype)
    per_anchor = coef_pos * pos_mean + coef_neg * neg_mean
    valid = (n_pos > 0) & (n_neg > 0)
    return torch.where(valid, per_anchor, zero).sum() / s.shape[0]


class SoftContrastiveLoss(MetricLoss):
    """``L = (1/B) sum_{i valid} [ (2/beta) mean_{p in P_i} log(1 + e^{-beta (S_ip - lambda)})
                                 + (2/alpha) mean_{n in N_i} log(1 + e^{alpha (S_in - lambda)}) ]``

    beta = ``scale_pos`` (2), alpha = ``scale_neg`` (40), lambda = ``threshold`` (0.7), as in the
    DDTAS code. Anchors with an empty mined positive or negative set are skipped (they still count
    in B). ``threshold``: 0-d, (2,) = (lambda_pos, lambda_neg), or per anchor row ((B,) or (B, 1)),
    differentiable. ``weights``:
    optional (B, M), multiplying each pair's softplus term. fp16/bf16 are computed in float32.

    ``compat_floor_div_bug=True`` reproduces DDTAS ``losses/MS.py`` (spec §6.4): there the mined
    negatives are re-added with ``margin // 10 = 0`` instead of ``margin / 10``, so they enter the
    loss as ``S + gamma_neg``; ``gamma_neg`` is read from ``selection.thresholds`` (0 if absent).
    With ``miner=asms`` this gives the DDTAS "MS" loss bit for bit.
    """

    def __init__(
        self,
        scale_pos: float = 2.0,
        scale_neg: float = 40.0,
        threshold: float = 0.7,
        compat_floor_div_bug: bool = False,
    ) -> None:
        super().__init__(threshold)
        # a scale <= 0 gives NaN (1 / scale) or a loss that pushes pairs the wrong way
        self.scale_pos = as_float("loss.scale_pos", scale_pos, 0.0, low_open=True)
        self.scale_neg = as_float("loss.scale_neg", scale_neg, 0.0, low_open=True)
        self.compat_floor_div_bug = bool(compat_floor_div_bug)

    def coefficients(self) -> tuple[float, float]:
        return 2.0 / self.scale_pos, 2.0 / self.scale_neg

    def forward(
        self,
        sim: Tensor,
        selection: PairSelection,
        threshold: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        s = upcast(sim)
        lam_pos, lam_neg = self.resolve_threshold(s, threshold)
        shift = 0.0
        if self.compat_floor_div_bug and "gamma_neg" in selection.thresholds:
            shift = selection.thresholds["gamma_neg"].to(device=s.device, dtype=s.dtype)
        coef_pos, coef_neg = self.coefficients()
        return mean_softplus_loss(
            s,
            selection,
            lam_pos,
            lam_neg,
            self.scale_pos,
            self.scale_neg,
            coef_pos,
            coef_neg,
            pair_weights(weights, s),
            shift,
        )
