"""Base class of all miners. Pure tensor code: no Lightning, no Hydra."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.miners.selection import PairSelection


class BaseMiner(nn.Module):
    """A miner maps (similarities, labels) to a :class:`PairSelection`.

    ``forward(sim, labels, ref_labels=None, *, epoch=0, generator=None)``:
      sim: (B, M) cosine similarities (anchors x candidates); may carry a graph, miners never use it.
      labels: (B,) anchor labels. ref_labels: (M,) candidate labels, or None when the candidates
        are the anchors themselves (the diagonal is then excluded by index).
      epoch: training progress, for miners whose behaviour follows a schedule (NSPA).
      generator: seeded ``torch.Generator`` for miners that draw at random.
    Masks are computed under ``no_grad``.
    """

    def forward(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        *,
        epoch: float = 0,
        generator: torch.Generator | None = None,
    ) -> PairSelection:
        with torch.no_grad():
            return self.mine(sim.detach(), labels, ref_labels, epoch=epoch, generator=generator)

    def mine(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None,
        *,
        epoch: float,
        generator: torch.Generator | None,
    ) -> PairSelection:
        raise NotImplementedError

    def mine_embeddings(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        **kwargs,
    ) -> PairSelection:
        """Convenience for plain-tensor users: cosine similarities of L2-normalised embeddings, then mine."""
        emb = F.normalize(embeddings, dim=1)
        ref = emb if ref_emb is None else F.normalize(ref_emb, dim=1)
        return self(emb @ ref.T, labels, ref_labels, **kwargs)
