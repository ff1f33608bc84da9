"""Base class of all miners. Pure tensor code: no Lightning, no Hydra."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.miners.selection import (
    DISTANCES,
    PairSelection,
    anchor_positive_pairs,
    candidate_masks,
    gram_sq_norms,
    label_masks,
    random_choice_per_row,
    sim_to_distance,
    triplet_selection,
)


class BaseMiner(nn.Module):
    """A miner maps (similarities, labels) to a :class:`PairSelection`.

    ``forward(sim, labels, ref_labels=None, *, epoch=0, generator=None)``:
      sim: (B, M) cosine similarities (anchors x candidates); may carry a graph, miners never use it.
      labels: (B,) anchor labels. ref_labels: (M,) candidate labels, or None when the candidates
        are the anchors themselves (the diagonal is then excluded by index).
      epoch: training progress, for miners whose behaviour follows a schedule (NSPA).
      generator: seeded ``torch.Generator`` for miners that draw at random.
    Masks are computed under ``no_grad``, in float32 for fp16/bf16 similarities (the thresholds and
    stats are then float32 too).
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
            s = sim.detach()
            if s.dtype in (torch.float16, torch.bfloat16):
                # margins such as gamma_neg = m/10 = 0.01 are a few bf16 ulps near S = 1: mine in float32
                s = s.float()
            return self.mine(s, labels, ref_labels, epoch=epoch, generator=generator)

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


SELECTS = ("all", "random")


class TripletMiner(BaseMiner):
    """Base of the triplet miners: a distance (``cosine``: 1 - S, ``euclidean``: sqrt(2 - 2S)) and a margin.

    For the anchor-positive pairs (a, p) and each negative n of a, with
    ``delta = d(a, n) - d(a, p)`` (so the triplet loss is ``relu(margin - delta)``):
      violating ("hard" in NSPA's sense):  delta < margin           (loss > 0)
      semi-hard:                           0 < delta < margin
    ``select="all"`` keeps every qualifying triplet (as PML's ``TripletMarginMiner``); ``"random"``
    keeps one qualifying negative per (a, p), uniformly at random (NSPA's single-policy rule).
    """

    def __init__(self, margin: float = 0.2, distance: str = "euclidean", select: str = "all") -> None:
        super().__init__()
        check_choice("miner.distance", distance, DISTANCES)
        check_choice("miner.select", select, SELECTS)
        self.margin = float(margin)
        self.distance = distance
        self.select = select

    def candidates(self, delta: Tensor, neg_rows: Tensor) -> Tensor:
        """(pairs, M) bool mask of the admissible negatives of each (a, p) pair."""
        raise NotImplementedError

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
        a, p = anchor_positive_pairs(pos)
        delta = dist[a] - dist[a, p][:, None]  # d(a, n) - d(a, p), (pairs, M)
        cand = self.candidates(delta, neg[a])
        if self.select == "all":
            k, n = cand.nonzero(as_tuple=True)
            a, p = a[k], p[k]
        else:
            n, ok = random_choice_per_row(cand, generator)
            a, p, n = a[ok], p[ok], n[ok]
        margin = torch.tensor(self.margin, dtype=sim.dtype, device=sim.device)
        return triplet_selection(a, p, n, sim.shape[0], sim.shape[1], thresholds={"margin": margin}, sq_norms=norms)


class PairMiner(BaseMiner):
    """Base of the threshold pair miners (MS, ASMS, AT-ASMS): owns the self-exclusion option.

    ``exclude_self_by_value=True`` reproduces the official code (same-label candidates with
    ``S >= self_threshold`` dropped, no index mask; spec ddtas.md §6.5); the default excludes the self
    pair by index.
    """

    def __init__(self, exclude_self_by_value: bool = False, self_threshold: float = 1.0 - 1e-6) -> None:
        super().__init__()
        self.exclude_self_by_value = bool(exclude_self_by_value)
        self.self_threshold = float(self_threshold)

    def candidates(self, sim: Tensor, labels: Tensor, ref_labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """All positive / negative candidates of each anchor, before mining."""
        return candidate_masks(
            sim,
            labels,
            ref_labels,
            exclude_self_by_value=self.exclude_self_by_value,
            self_threshold=self.self_threshold,
        )
