"""No mining: every positive and every negative pair of the batch (or against the memory)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection


class AllPairsMiner(BaseMiner):
    """Selects all pairs: ``pos = same label`` (self excluded by index), ``neg = different label``.

    This is what a loss sees when mining is switched off (config ``miner=none``).
    """

    def mine(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None,
        *,
        epoch: float,
        generator: torch.Generator | None,
    ) -> PairSelection:
        return PairSelection.all_pairs(labels, ref_labels)
