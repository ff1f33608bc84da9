"""Static threshold: the grid-search baseline. lambda comes from the config and never changes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddtas_lightning.losses.base import MetricLoss
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.policies.base import StepBatch, StepOutput, ThresholdPolicy, embed_and_mine


class StaticThreshold(ThresholdPolicy):
    """lambda fixed for the whole run: ``threshold`` if given, else the loss's own ``threshold``.

    Sweep it with ``-m loss.threshold=0.3,0.5,0.7`` (or ``threshold_policy.threshold=...``).
    """

    # the step hands the batch embeddings to a loss / miner that needs them (loss=pml, miner=pml)
    passes_embeddings = True

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__()
        self.threshold = threshold

    def current_threshold(self) -> Tensor | None:
        return None if self.threshold is None else torch.tensor(float(self.threshold))

    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        wants = getattr(loss_fn, "needs_embeddings", False)  # loss=pml: PML losses take embeddings
        sim, selection, *emb = embed_and_mine(model, miner, batch, with_embeddings=wants)
        extra = {"embeddings": emb[0], "labels": batch.labels} if wants else {}
        lam = self.current_threshold()
        loss = loss_fn(sim, selection, threshold=None if lam is None else lam.to(sim.device), **extra)
        value = loss_fn.threshold if lam is None else float(lam)
        return StepOutput(loss=loss, selection=selection, logs={"train/lambda": torch.tensor(value)})
