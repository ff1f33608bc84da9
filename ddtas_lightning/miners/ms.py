"""Multi-similarity pair mining (Wang et al., "Multi-Similarity Loss with General Pair Weighting for
Deep Metric Learning", CVPR 2019), with the semantics of pytorch-metric-learning's ``MultiSimilarityMiner``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.miners.base import PairMiner
from ddtas_lightning.miners.selection import PairSelection, basic_stats


def hardest_similarities(sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Per anchor: ``minP_i = min_{j in P_i} S_ij`` (+inf if no positive) and
    ``maxN_i = max_{j in N_i} S_ij`` (-inf if no negative), as (B, 1) columns."""
    inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
    min_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
    max_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
    return min_pos, max_neg


class MultiSimilarityMiner(PairMiner):
    """MS mining with one tolerance epsilon for both sides.

    For anchor i with positives P_i and negatives N_i (all of them, before mining):
      keep positive j  iff  S_ij - epsilon < max_{n in N_i} S_in
      keep negative j  iff  S_ij + epsilon > min_{p in P_i} S_ip
    An anchor without positives mines no negative and vice versa (the +-inf of an empty min/max).
    The comparisons are written exactly as in PML so that the masks agree bit for bit with
    ``pytorch_metric_learning.miners.MultiSimilarityMiner(epsilon)``.

    ``exclude_self_by_value=True`` reproduces the official MS code (MalongTech/research-ms-loss): no
    index-based self exclusion, positives with ``S >= 1 - 1e-5`` dropped instead (which also drops
    exact duplicates).
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        exclude_self_by_value: bool = False,
        self_threshold: float = 1.0 - 1e-5,
    ) -> None:
        super().__init__(exclude_self_by_value, self_threshold)
        self.epsilon = float(epsilon)

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
        min_pos, max_neg = hardest_similarities(sim, pos, neg)
        pos_mask = pos & (sim - self.epsilon < max_neg)
        neg_mask = neg & (sim + self.epsilon > min_pos)
        eps = torch.tensor(self.epsilon, dtype=sim.dtype, device=sim.device)
        return PairSelection(
            pos_mask,
            neg_mask,
            thresholds={"epsilon": eps, "gamma_pos": eps, "gamma_neg": eps},
            stats=basic_stats(pos_mask, neg_mask),
        )
