"""AT-ASMS: adaptive-tolerance asymmetric sample mining (DDTAS, Jiang et al., ACM TOMM 2024;
spec ddtas.md §1.2-1.3, the released code ``losses/SoftCon.py``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.miners.asms import asms_masks
from ddtas_lightning.miners.base import PairMiner
from ddtas_lightning.miners.ms import hardest_similarities
from ddtas_lightning.miners.selection import PairSelection, basic_stats

COUNT_NEG_MARGINS = ("m", "m/10")


class AdaptiveToleranceASMS(PairMiner):
    """ASMS whose thresholds adapt to the batch, once per call (two passes, one gamma pair per batch).

    1. Counting pass: ``N_pos = sum_i |P_i|`` (all positive pairs) and
       ``n_neg = sum_i |{j in N_i : S_ij > minP_i - gamma_c}|`` (negatives the MS rule would mine).
       ``gamma_c = m`` in the released code (default, ``count_neg_margin="m"``); the paper's figure
       implies ``gamma_c = m/10`` (``count_neg_margin="m/10"``).
    2. Ratio ``r = n_neg / N_pos`` (``r = 0`` when the batch has no positive pair). If ``r > 1``, the
       tolerance is ``t = k * sigmoid(r)`` (k = 1/2), else ``t = 0``; then
       ``gamma_pos = m (1 + t)``, ``gamma_neg = (m / 10) (1 - t)``.
    3. Re-mine with the ASMS rule (:func:`asms_masks`) and these thresholds.

    ``thresholds``: ``gamma_pos``, ``gamma_neg`` (used for the final masks), ``gamma_count``.
    ``stats``: ``ratio``, ``tolerance``, ``counted_neg_pairs`` (n_neg), ``all_pos_pairs`` (N_pos) and
    the basic counts. Everything stays a tensor (no host sync). ``exclude_self_by_value`` as in ASMS.
    """

    def __init__(
        self,
        margin: float = 0.1,
        count_neg_margin: str = "m",
        tolerance_scale: float = 0.5,
        exclude_self_by_value: bool = False,
        self_threshold: float = 1.0 - 1e-6,
    ) -> None:
        super().__init__(exclude_self_by_value, self_threshold)
        check_choice("miner.count_neg_margin", count_neg_margin, COUNT_NEG_MARGINS)
        self.margin = float(margin)
        self.count_neg_margin = count_neg_margin
        self.tolerance_scale = float(tolerance_scale)
        self.exclude_self_by_value = bool(exclude_self_by_value)
        self.self_threshold = float(self_threshold)

    def mine(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None,
        *,
        epoch: float,
        generator: torch.Generator | None,
    ) -> PairSelection:
        pos, neg = self.candidates(sim, labels, ref_labels)
        m = self.margin
        gamma_count = m if self.count_neg_margin == "m" else m / 10
        min_pos, _ = hardest_similarities(sim, pos, neg)
        n_neg = (neg & (sim > min_pos - gamma_count)).sum()
        n_pos_all = pos.sum()
        rdtype = torch.promote_types(sim.dtype, torch.float32)
        ratio = n_neg.to(rdtype) / n_pos_all.clamp(min=1).to(rdtype)
        tolerance = torch.where(
            ratio > 1, self.tolerance_scale * torch.sigmoid(ratio), torch.zeros_like(ratio)
        ).to(sim.dtype)
        gamma_pos = m * (1 + tolerance)
        gamma_neg = (m / 10) * (1 - tolerance)
        pos_mask, neg_mask = asms_masks(sim, pos, neg, gamma_pos, gamma_neg)
        stats = basic_stats(pos_mask, neg_mask)
        stats.update(ratio=ratio, tolerance=tolerance, counted_neg_pairs=n_neg, all_pos_pairs=n_pos_all)
        return PairSelection(
            pos_mask,
            neg_mask,
            thresholds={
                "gamma_pos": gamma_pos,
                "gamma_neg": gamma_neg,
                "gamma_count": torch.tensor(gamma_count, dtype=sim.dtype, device=sim.device),
            },
            stats=stats,
        )
