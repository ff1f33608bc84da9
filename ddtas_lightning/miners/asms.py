"""ASMS: asymmetric sample mining (DDTAS, Jiang et al., ACM TOMM 2024; spec ddtas.md §1.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.miners.base import PairMiner
from ddtas_lightning.miners.ms import hardest_similarities
from ddtas_lightning.miners.selection import PairSelection, basic_stats


def asms_masks(
    sim: Tensor, pos: Tensor, neg: Tensor, gamma_pos: Tensor | float, gamma_neg: Tensor | float
) -> tuple[Tensor, Tensor]:
    """ASMS rule with strict inequalities (the official code's ``relu(.) > 0``):

    keep positive j in P_i  iff  S_ij < maxN_i + gamma_pos
    keep negative j in N_i  iff  S_ij > minP_i - gamma_neg
    """
    min_pos, max_neg = hardest_similarities(sim, pos, neg)
    return pos & (sim < max_neg + gamma_pos), neg & (sim > min_pos - gamma_neg)


class ASMS(PairMiner):
    """Static asymmetric mining: ``gamma_pos = margin`` (lenient on positives), ``gamma_neg = margin / 10``
    (strict on negatives). Compare MS mining, ``gamma_pos = gamma_neg = epsilon``.

    Anchors left with an empty positive or negative set are dropped by the losses that need both
    (``PairSelection.valid_anchors``). ``exclude_self_by_value=True`` gives the official code's
    self exclusion (positives with ``S >= 1 - 1e-6`` dropped, no index mask; spec §6.5).
    """

    def __init__(
        self,
        margin: float = 0.1,
        exclude_self_by_value: bool = False,
        self_threshold: float = 1.0 - 1e-6,
    ) -> None:
        super().__init__(exclude_self_by_value, self_threshold)
        self.margin = float(margin)

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
        gamma_pos = torch.tensor(self.margin, dtype=sim.dtype, device=sim.device)
        gamma_neg = torch.tensor(self.margin / 10, dtype=sim.dtype, device=sim.device)
        pos_mask, neg_mask = asms_masks(sim, pos, neg, gamma_pos, gamma_neg)
        return PairSelection(
            pos_mask,
            neg_mask,
            thresholds={"gamma_pos": gamma_pos, "gamma_neg": gamma_neg},
            stats=basic_stats(pos_mask, neg_mask),
        )
