"""Binomial deviance loss (Yi, Lei, Liao, Li, "Deep Metric Learning for Person Re-identification",
ICPR 2014) in the form of the DDTAS / Deep_Metric code (``losses/Binomial.py``, spec ddtas.md §3)."""

from __future__ import annotations

from torch import Tensor

from ddtas_lightning.config.validation import as_float
from ddtas_lightning.losses.base import MetricLoss, pair_weights, upcast
from ddtas_lightning.losses.soft_contrastive import mean_softplus_loss
from ddtas_lightning.miners.selection import PairSelection


class BinomialDevianceLoss(MetricLoss):
    """``L = (1/B) sum_{i valid} [ mean_{p in P_i} log(1 + e^{-scale_pos (S_ip - lambda)})
                                 + mean_{n in N_i} log(1 + e^{ scale_neg (S_in - lambda)}) ]``

    The code's default branch (``hard_mining=None``): scale_pos = 2, scale_neg = alpha = 40,
    lambda = ``threshold`` = 0.5; anchors without a selected positive or negative are skipped (still
    counted in B). Mining is the miner's job here (``miner=none`` = the code's default).
    ``normalize_scales=True`` multiplies the two terms by 2/scale_pos and 2/scale_neg, as the code's
    ``hard_mining`` branch does (which then equals ``soft_contrastive`` with lambda = 0.5).
    ``threshold``: 0-d, (2,) = (lambda_pos, lambda_neg), or per anchor row ((B,) or (B, 1)).
    ``weights``: (B, M), multiplying each
    pair's term. fp16/bf16 are computed in float32.
    """

    def __init__(
        self,
        scale_pos: float = 2.0,
        scale_neg: float = 40.0,
        threshold: float = 0.5,
        normalize_scales: bool = False,
    ) -> None:
        super().__init__(threshold)
        # a scale <= 0 gives NaN (1 / scale) or a loss that pushes pairs the wrong way
        self.scale_pos = as_float("loss.scale_pos", scale_pos, 0.0, low_open=True)
        self.scale_neg = as_float("loss.scale_neg", scale_neg, 0.0, low_open=True)
        self.normalize_scales = bool(normalize_scales)

    def forward(
        self,
        sim: Tensor,
        selection: PairSelection,
        threshold: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        s = upcast(sim)
        lam_pos, lam_neg = self.resolve_threshold(s, threshold)
        if self.normalize_scales:
            coef_pos, coef_neg = 2.0 / self.scale_pos, 2.0 / self.scale_neg
        else:
            coef_pos = coef_neg = 1.0
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
        )
