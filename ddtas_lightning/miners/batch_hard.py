"""Batch-hard triplet mining (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss", 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import (
    DISTANCES,
    PairSelection,
    gram_sq_norms,
    label_masks,
    sim_to_distance,
    triplet_selection,
)


class BatchHardMiner(BaseMiner):
    """One triplet per anchor: its farthest positive and its nearest negative.

    ``p*(a) = argmax_{p in P_a} d(a, p)``, ``n*(a) = argmin_{n in N_a} d(a, n)``; anchors without a
    positive or a negative yield no triplet (as PML's ``BatchHardMiner``). With ``margin=None``
    (default) every anchor's triplet is kept (PML parity); with a margin only those with
    ``d(a,p*) - d(a,n*) + margin > 0`` (the others have zero triplet loss).
    Ties go to the lowest index.
    """

    def __init__(self, margin: float | None = None, distance: str = "euclidean") -> None:
        super().__init__()
        check_choice("miner.distance", distance, DISTANCES)
        self.margin = None if margin is None else float(margin)
        self.distance = distance

    def mine(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None,
        *,
        epoch: float,
        generator: torch.Generator | None,
    ) -> PairSelection:
        pos, neg = label_masks(labels, ref_labels)
        norms = gram_sq_norms(sim, ref_labels)  # exact for raw embeddings too
        dist = sim_to_distance(sim, self.distance, sq_norms=norms)
        inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
        d_ap, p = torch.where(pos, dist, -inf).max(dim=1)
        d_an, n = torch.where(neg, dist, inf).min(dim=1)
        keep = pos.any(1) & neg.any(1)
        thresholds = {}
        if self.margin is not None:
            keep &= d_an - d_ap < self.margin
            thresholds["margin"] = torch.tensor(self.margin, dtype=sim.dtype, device=sim.device)
        a = keep.nonzero(as_tuple=True)[0]
        return triplet_selection(a, p[a], n[a], sim.shape[0], sim.shape[1], thresholds=thresholds, sq_norms=norms)
