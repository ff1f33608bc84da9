"""Base class of all losses. Pure tensor code: no Lightning, no Hydra."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.miners.selection import PairSelection, label_masks


class MetricLoss(nn.Module):
    """``forward(sim, selection, threshold=None, weights=None) -> scalar``.

    sim: (B, M) cosine similarities with a graph.
    selection: the miner's :class:`PairSelection` (``PairSelection.all_pairs`` for no mining).
    threshold: the loss threshold lambda as a tensor, so a policy can differentiate through it:
        0-d (one lambda) or shape (2,) = (lambda_pos, lambda_neg). ``None`` uses ``self.threshold``.
    weights: optional (B, M) per-pair weights (MMSI / pair-weight policies); how they enter is
        documented per loss.
    The result is exactly zero, with a graph to ``sim``, when nothing is selected; never NaN.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def resolve_threshold(self, sim: Tensor, threshold: Tensor | float | None) -> tuple[Tensor, Tensor]:
        """(lambda_pos, lambda_neg) as 0-d tensors in ``sim``'s dtype/device."""
        if threshold is None:
            threshold = self.threshold
        t = torch.as_tensor(threshold, device=sim.device).to(sim.dtype)
        if t.ndim == 0:
            return t, t
        if t.shape == (2,):
            return t[0], t[1]
        raise ValueError(f"threshold must be a scalar or a (pos, neg) pair, got shape {tuple(t.shape)}")

    def forward(
        self,
        sim: Tensor,
        selection: PairSelection,
        threshold: Tensor | float | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def from_embeddings(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """PML-style call: L2-normalise, build similarities, take PML's ``indices_tuple`` (or all pairs)."""
        emb = F.normalize(embeddings, dim=1)
        ref = emb if ref_emb is None else F.normalize(ref_emb, dim=1)
        sim = emb @ ref.T
        if indices_tuple is None:
            selection = PairSelection.all_pairs(labels, ref_labels)
        else:
            selection = PairSelection.from_indices_tuple(indices_tuple, sim.shape[0], sim.shape[1])
        return self(sim, selection, **kwargs)


def zero_loss(sim: Tensor) -> Tensor:
    """A zero that keeps the graph (DDP needs every parameter to receive a gradient)."""
    return sim.sum() * 0.0


__all__ = ["MetricLoss", "zero_loss", "label_masks"]
