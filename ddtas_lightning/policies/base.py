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
from ddtas_lightning.runtime.distributed import gather, gather_with_grad


@dataclass
class StepBatch:
    """Everything a policy may use in one training step.

    images: this rank's share of the global train batch. labels / indices: labels and dataset indices
    of the *global* batch (all ranks, rank order; equal to this rank's under a single process), i.e.
    of the rows of :func:`global_embeddings`. meta_*: the meta batch (identical on every rank).
    global_step: optimiser steps taken so far (schedules counted in steps).
    """

    images: Tensor
    labels: Tensor
    epoch: float = 0
    generator: torch.Generator | None = None
    meta_images: Tensor | None = None
    meta_labels: Tensor | None = None
    indices: Tensor | None = None
    meta_indices: Tensor | None = None
    global_step: int = 0


@dataclass
class StepOutput:
    """The loss to back-propagate for the real update, and what to log (0-d tensors).

    skip_update: the policy has nothing to learn from this step (e.g. MMSI's memory warm-up): the
    module still back-propagates ``loss`` (a zero with a graph, so DDP's gradient sync stays in step)
    but takes no optimiser step. Must be the same on every rank.
    """

    loss: Tensor
    selection: PairSelection
    logs: dict[str, Tensor] = field(default_factory=dict)
    skip_update: bool = False


class ThresholdPolicy(nn.Module):
    """Base class. ``step(model, loss_fn, miner, batch) -> StepOutput``.

    needs_meta_batch: the data module then also provides a meta batch (issue: meta-learned thresholds).
    """

    needs_meta_batch = False
    # The meta batch's images per class when the policy needs a specific one (MMSI: 1), else None
    # (``data.meta_K``).
    meta_K: int | None = None

    def current_threshold(self) -> Tensor | None:
        """The lambda the loss should use now (None: the loss's own configured threshold)."""
        return None

    def step(self, model: nn.Module, loss_fn: MetricLoss, miner: BaseMiner, batch: StepBatch) -> StepOutput:
        raise NotImplementedError

    def set_run_length(self, total_steps: int) -> None:
        """Called by the module when training starts: the optimiser steps the whole run takes."""

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the module right after the real optimiser step of this step (not when the update
        is skipped): a policy that follows the training trajectory (hypergrad) reads the update here."""

    def _apply(self, fn, recurse: bool = True):
        """Policy state stays float32 under every precision: ``module.to(torch.bfloat16)`` (Lightning's
        ``bf16-true``) or ``.half()`` move the buffers' device but keep float32 ones float32 (a 1e-3
        step of lambda rounds away in bf16); casts to float64 (``.double()``) apply as usual."""
        float32 = {(id(m), n): b for m in self.modules() for n, b in m._buffers.items()
                   if b is not None and b.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for m in self.modules():
            for n, b in m._buffers.items():
                old = float32.get((id(m), n))
                if old is not None and b is not None and b.is_floating_point() and b.element_size() < 4:
                    m._buffers[n] = old.to(b.device)  # the float32 values themselves, not a lossy round trip
        return out


def similarities(embeddings: Tensor) -> Tensor:
    """Cosine similarities of the (L2-normalised) embeddings of one batch: ``E E^T``."""
    return embeddings @ embeddings.T


def global_embeddings(local: Tensor) -> Tensor:
    """The embeddings of the whole global batch from this rank's rows (gathered with gradient under
    DDP; the identity otherwise). See :mod:`ddtas_lightning.runtime.distributed`."""
    return gather_with_grad(local)


def global_similarities_with_tangent(local: Tensor, local_tangent: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, Sdot)`` of the global batch from this rank's embeddings and their forward-mode tangent:
    ``S = E E^T`` (E gathered with gradient), ``Sdot = Edot E^T + E Edot^T`` (tangents gathered, constant)."""
    emb = global_embeddings(local)
    emb_dot = gather(local_tangent.detach())
    e = emb.detach()
    return similarities(emb), emb_dot @ e.T + e @ emb_dot.T


def embed_and_mine(model: nn.Module, miner: BaseMiner, batch: StepBatch, *, with_embeddings: bool = False):
    """Similarity matrix of the global train batch and the miner's selection (computed once); with
    ``with_embeddings`` also the global embeddings (for losses that need them, e.g. ``loss=pml``). A miner
    that declares ``needs_embeddings`` (``miner=pml``) gets them as ``embeddings=``."""
    emb = global_embeddings(model(batch.images))
    sim = similarities(emb)
    extra = {"embeddings": emb} if getattr(miner, "needs_embeddings", False) else {}
    selection = miner(sim, batch.labels, epoch=batch.epoch, generator=batch.generator, **extra)
    return (sim, selection, emb) if with_embeddings else (sim, selection)
