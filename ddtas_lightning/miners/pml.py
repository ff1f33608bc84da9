"""Any pytorch-metric-learning miner inside the framework (``miner=pml miner.name=TripletMarginMiner``), and
our miners from plain PML code (:func:`as_pml_miner`).

:class:`PMLMiner` runs ``pytorch_metric_learning.miners.<name>(**kwargs)`` on the global batch's
embeddings (detached; PML's own distance, default per miner) and turns its ``indices_tuple`` (pairs
``(a1, p, a2, n)`` or triplets ``(a, p, n)``) into our :class:`PairSelection` masks, so any of our
losses (or ``loss=pml``) takes it. Runs under ``threshold_policy=static`` (see ``losses/pml.py``).
pytorch-metric-learning is the optional ``pml`` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.losses.pml import _plain, import_pml, pml_class
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import PairSelection


class PMLMiner(BaseMiner):
    """``pytorch_metric_learning.miners.<name>(**kwargs)`` as a :class:`BaseMiner`.

    ``forward(sim, labels, ref_labels=None, *, epoch=0, generator=None, embeddings)``: the policy passes
    the batch ``embeddings`` (the miner declares ``needs_embeddings``); ``sim`` is not used.
    """

    needs_embeddings = True

    def __init__(self, name: str = "MultiSimilarityMiner", kwargs: Mapping | None = None) -> None:
        super().__init__()
        import_pml("miner=pml")
        import pytorch_metric_learning.miners as miners

        cls = pml_class(miners, name, "miner.name", miners.BaseMiner)
        self.name = name
        try:
            self.miner = cls(**_plain(kwargs))
        except TypeError as e:
            raise ConfigError(f"miner.kwargs for {name}: {e}") from None

    def forward(self, sim: Tensor, labels: Tensor, ref_labels: Tensor | None = None, *, epoch: float = 0,
                generator: torch.Generator | None = None, embeddings: Tensor | None = None) -> PairSelection:
        if embeddings is None:
            raise ValueError(f"miner=pml ({self.name}) needs the batch embeddings (threshold_policy=static passes them)")
        with torch.no_grad():
            emb = embeddings.detach().float()
            indices = self.miner(emb, labels.to(emb.device))
        selection = PairSelection.from_indices_tuple(tuple(indices), sim.shape[0], sim.shape[1])
        if len(indices) == 3:
            selection.stats["triplets"] = torch.tensor(len(indices[0]))
        return selection


def as_pml_miner(miner: BaseMiner) -> Callable[..., tuple[Tensor, ...]]:
    """``miner(embeddings, labels, ref_emb=None, ref_labels=None) -> indices_tuple`` with PML's calling
    convention: ``(a1, p, a2, n)`` pairs, or ``(a, p, n)`` for our triplet miners; any PML loss takes it."""

    def call(embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None, ref_labels: Tensor | None = None,
             **kwargs) -> tuple[Tensor, ...]:
        return miner.mine_embeddings(embeddings, labels, ref_emb, ref_labels, **kwargs).to_indices_tuple()

    return call
