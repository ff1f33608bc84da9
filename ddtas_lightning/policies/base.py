"""Threshold policies decide the loss threshold (lambda) and/or per-pair weights of a training step.

A policy owns the loss computation of one step, because the meta-learning policies must embed, mine
and differentiate in a particular order (virtual step, meta batch, ...). Pure torch: no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ddtas_lightning.losses.base import MetricLoss
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection


@dataclass
class StepBatch:
    """Everything a policy may use in one training step."""

    images: Tensor
    labels: Tensor
    epoch: float = 0
    generator: torch.Generator | None = None
    meta_images: Tensor | None = None
    meta_labels: Tensor | None = None


@dataclass
class StepOutput:
    """The loss to back-propagate for the real update, and what to log (0-d tensors)."""

    loss: Tensor
    selection: PairSelection
    logs: dict[str, Tensor] = field(default_factory=dict)


class ThresholdPolicy(nn.Module):
    """Base class. ``step(model, loss_fn, miner, batch) -> StepOutput``.

    needs_meta_batch: the data module then also provides a meta batch (issue: meta-learned thresholds).
    """

    needs_meta_batch = False

    def current_threshold(self) -> Tensor | None:
        """The lambda the loss should use now (None: the loss's own configured threshold)."""
        return None

    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        raise NotImplementedError


def embed_and_mine(model: nn.Module, miner: BaseMiner, batch: StepBatch) -> tuple[Tensor, PairSelection]:
    """Embeddings of the train batch, their similarity matrix and the miner's selection (computed once)."""
    embeddings = model(batch.images)
    sim = embeddings @ embeddings.T
    selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator)
    return sim, selection
