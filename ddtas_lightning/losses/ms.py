"""Multi-similarity loss (Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019), in the form of pytorch-metric-learning's
``MultiSimilarityLoss`` and the official code (MalongTech/research-ms-loss)."""

from __future__ import annotations

from torch import Tensor

from ddtas_lightning.config.validation import as_float
from ddtas_lightning.losses.base import MetricLoss, masked_log1p_sum_exp, pair_weights, upcast
from ddtas_lightning.miners.selection import PairSelection


class MultiSimilarityLoss(MetricLoss):
    """``L = (1/B) sum_i [ (1/a) log(1 + sum_{p in P_i} w_ip e^{-a (S_ip - lambda_pos)})
                        + (1/b) log(1 + sum_{n in N_i} w_in e^{ b (S_in - lambda_neg)}) ]``

    over **all** B anchor rows (a row with an empty mined set contributes 0 for that term), with
    a = ``scale_pos`` (2.0), b = ``scale_neg`` (40.0), lambda = ``threshold`` (0.5): the official
    MS code's values (PML's defaults are alpha=2, beta=50, base=0.5).
    Equals PML ``MultiSimilarityLoss(alpha=scale_pos, beta=scale_neg, base=threshold)`` on the same
    pairs, except for PML's guard that returns 0 whenever every index tensor of the (converted) pair
    tuple has length <= 1 (e.g. exactly one mined positive and one mined negative pair); we return the
    formula's value there.

    ``threshold``: 0-d (one lambda), (2,) = (lambda_pos, lambda_neg), or one lambda per anchor row
    ((B,) or (B, 1): row i uses lambda_i for its positives and negatives), differentiable.
    ``weights``: optional (B, M), >= 0, multiplying each pair's exponential inside the log-sum.
    fp16/bf16 inputs are computed in float32 and the loss is returned in float32.
    """

    def __init__(self, scale_pos: float = 2.0, scale_neg: float = 40.0, threshold: float = 0.5) -> None:
        super().__init__(threshold)
        # a scale <= 0 gives NaN (1 / scale) or a loss that pushes pairs the wrong way
        self.scale_pos = as_float("loss.scale_pos", scale_pos, 0.0, low_open=True)
        self.scale_neg = as_float("loss.scale_neg", scale_neg, 0.0, low_open=True)

    def forward(
        self,
        sim: Tensor,
        selection: PairSelection,
        threshold: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        s = upcast(sim)
        lam_pos, lam_neg = self.resolve_threshold(s, threshold)
        w = pair_weights(weights, s)
        a, b = self.scale_pos, self.scale_neg
        pos_term = masked_log1p_sum_exp(-a * (s - lam_pos), selection.pos_mask, w) / a
        neg_term = masked_log1p_sum_exp(b * (s - lam_neg), selection.neg_mask, w) / b
        return (pos_term + neg_term).mean()
