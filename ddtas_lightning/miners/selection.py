"""The contract between miners and losses: boolean pair masks over a similarity matrix.

A miner looks at a similarity matrix ``S`` (B x M: B anchors against M candidates, M == B when the
candidates are the batch itself) and returns a :class:`PairSelection`. Losses read only the masks
(and, for triplet losses, the optional triplet index tensors), so any miner composes with any loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def label_masks(labels: Tensor, ref_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """All positive and all negative pairs between ``labels`` (B) and ``ref_labels`` (M).

    With ``ref_labels=None`` the candidates are the anchors themselves and the diagonal (an image
    paired with itself) is excluded *by index*, never by value, so exact duplicates stay positives.
    """
    same_source = ref_labels is None
    ref = labels if same_source else ref_labels
    same = labels[:, None] == ref[None, :]
    pos = same.clone()
    if same_source:
        pos.fill_diagonal_(False)
    return pos, ~same


@dataclass
class PairSelection:
    """Pairs chosen by a miner.

    pos_mask, neg_mask: bool (B, M); ``pos_mask[i, j]`` keeps the positive pair (anchor i, candidate j).
    thresholds: the thresholds the miner actually used (e.g. ``gamma_pos``, ``gamma_neg``), 0-d tensors.
    stats: 0-d tensors for logging (``pos_pairs``, ``neg_pairs``, ``ratio``, ``tolerance``,
        ``anchors_without_pairs``, ...).
    triplets: optional ``(anchor, positive, negative)`` index tensors for triplet miners; pair losses
        ignore it, triplet losses use it instead of enumerating all triplets from the masks.
    """

    pos_mask: Tensor
    neg_mask: Tensor
    thresholds: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    triplets: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def valid_anchors(self) -> Tensor:
        """Anchors with at least one mined positive and one mined negative."""
        return self.pos_mask.any(1) & self.neg_mask.any(1)

    @classmethod
    def all_pairs(cls, labels: Tensor, ref_labels: Tensor | None = None) -> PairSelection:
        pos, neg = label_masks(labels, ref_labels)
        return cls(pos, neg, stats=basic_stats(pos, neg))

    # ---- pytorch-metric-learning interop -------------------------------------------------------
    def to_indices_tuple(self) -> tuple[Tensor, ...]:
        """PML's ``(a1, p, a2, n)`` pair tuple, or ``(a, p, n)`` when the miner produced triplets."""
        if self.triplets is not None:
            return self.triplets
        a1, p = self.pos_mask.nonzero(as_tuple=True)
        a2, n = self.neg_mask.nonzero(as_tuple=True)
        return a1, p, a2, n

    @classmethod
    def from_indices_tuple(
        cls, indices_tuple: tuple[Tensor, ...], num_anchors: int, num_candidates: int | None = None
    ) -> PairSelection:
        """Build masks from PML's pair tuple ``(a1, p, a2, n)`` or triplet tuple ``(a, p, n)``."""
        m = num_anchors if num_candidates is None else num_candidates
        device = indices_tuple[0].device
        pos = torch.zeros(num_anchors, m, dtype=torch.bool, device=device)
        neg = torch.zeros_like(pos)
        triplets = None
        if len(indices_tuple) == 4:
            a1, p, a2, n = indices_tuple
        elif len(indices_tuple) == 3:
            a1, p, n = indices_tuple
            a2 = a1
            triplets = tuple(indices_tuple)
        else:
            raise ValueError(
                f"indices_tuple must have 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {len(indices_tuple)}"
            )
        pos[a1, p] = True
        neg[a2, n] = True
        return cls(pos, neg, stats=basic_stats(pos, neg), triplets=triplets)


def basic_stats(pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
    """Counts every miner reports: mined positive / negative pairs and anchors left without a pair."""
    valid = pos.any(1) & neg.any(1)
    return {
        "pos_pairs": pos.sum(),
        "neg_pairs": neg.sum(),
        "anchors_without_pairs": (~valid).sum(),
    }
