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
    self_gram: the miner measured distances with the squared norms on the diagonal of S (a batch
        against itself, :func:`gram_sq_norms`), so they are exact for raw (un-normalised) embeddings;
        a distance-based loss then reads the norms off the diagonal of its S too. False: unit vectors.
    """

    pos_mask: Tensor
    neg_mask: Tensor
    thresholds: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    triplets: tuple[Tensor, Tensor, Tensor] | None = None
    self_gram: bool = False

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


# ---- helpers shared by the miners and the triplet loss ------------------------------------------
DISTANCES = ("cosine", "euclidean")


def candidate_masks(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    *,
    exclude_self_by_value: bool = False,
    self_threshold: float = 1.0 - 1e-6,
) -> tuple[Tensor, Tensor]:
    """All positive / negative candidates of each anchor, before any mining.

    Default: :func:`label_masks` (self pair excluded by index). ``exclude_self_by_value=True`` is the
    official DDTAS / MS code's behaviour (spec ddtas.md §6.5): the diagonal is *not* removed by index,
    instead every same-label candidate with ``S >= self_threshold`` is dropped (this drops exact
    duplicates too, and keeps the self pair if rounding puts it below the threshold).
    """
    if not exclude_self_by_value:
        return label_masks(labels, ref_labels)
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref[None, :]
    return same & (sim < self_threshold), ~same


def sim_to_distance(
    sim: Tensor,
    distance: str,
    *,
    squared: bool = False,
    sq_norms: Tensor | None = None,
    ref_sq_norms: Tensor | None = None,
) -> Tensor:
    """Distances from a matrix of dot products ``S = E R^T`` (B x M).

    Without ``sq_norms`` the embeddings are taken to be unit vectors (``||a||^2 = 1``). With
    ``sq_norms`` (B,) = ``||a_i||^2`` and ``ref_sq_norms`` (M,) = ``||r_j||^2`` (default: ``sq_norms``)
    the distances are exact for raw (un-normalised) embeddings too, as the Gram identity
    ``||a - r||^2 = ||a||^2 + ||r||^2 - 2 a.r`` gives:

    ``euclidean``: ``||a - r||`` (``squared=True``: ``||a - r||^2``); the square root is taken through a
    safe ``where``, so duplicates give distance 0 with a zero (not NaN) gradient.
    ``cosine``: ``1 - a.r / (||a|| ||r||)`` (``1 - S`` for unit vectors).

    For a batch against itself, :func:`gram_sq_norms` reads the squared norms off the diagonal of S.
    """
    if sq_norms is None:
        na = nb = None
    else:
        na = sq_norms[:, None]
        nb = (sq_norms if ref_sq_norms is None else ref_sq_norms)[None, :]
    return distance_from_dots(sim, distance, squared=squared, sq_norm_a=na, sq_norm_b=nb)


def distance_from_dots(
    dots: Tensor,
    distance: str,
    *,
    squared: bool = False,
    sq_norm_a: Tensor | None = None,
    sq_norm_b: Tensor | None = None,
) -> Tensor:
    """Element-wise :func:`sim_to_distance`: ``dots``, ``sq_norm_a`` and ``sq_norm_b`` broadcast together
    (``None`` norms: unit vectors)."""
    if squared and distance != "euclidean":
        raise ValueError(f"squared distances need distance='euclidean', got {distance!r}")
    if distance == "cosine":
        if sq_norm_a is None:
            return 1.0 - dots
        denom = (sq_norm_a * sq_norm_b).clamp(min=torch.finfo(dots.dtype).tiny).sqrt()
        return 1.0 - dots / denom
    if distance == "euclidean":
        if sq_norm_a is None:
            sq = (2.0 - 2.0 * dots).clamp(min=0.0)
        else:
            sq = (sq_norm_a + sq_norm_b - 2.0 * dots).clamp(min=0.0)
        if squared:
            return sq
        pos = sq > 0
        return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


UNIT_NORM_TOL = 1e-5  # |S_ii - 1| below this for every i: the batch is taken as unit vectors


def gram_sq_norms(sim: Tensor, ref_labels: Tensor | None) -> Tensor | None:
    """The squared norms ``||e_i||^2 = S_ii`` of a batch compared with itself (``ref_labels=None``, so
    ``S = E E^T`` is a Gram matrix), for raw (un-normalised) embeddings; ``None`` when every norm is 1
    (to ``UNIT_NORM_TOL``: L2-normalised embeddings keep the unit-vector formulas, bit for bit) or when
    the candidates are not the anchors (a memory), whose norms S does not hold: those must be unit vectors."""
    if ref_labels is not None or sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        return None
    diag = sim.diagonal()
    if bool(((diag - 1.0).abs() <= UNIT_NORM_TOL).all()):
        return None
    return diag


def anchor_positive_pairs(pos: Tensor, unordered: bool = False) -> tuple[Tensor, Tensor]:
    """``(a, p)`` index tensors of the positive pairs in row-major order; ``unordered`` keeps a < p only."""
    mask = torch.triu(pos, diagonal=1) if unordered else pos
    a, p = mask.nonzero(as_tuple=True)
    return a, p


def random_choice_per_row(
    cand: Tensor, generator: torch.Generator | None = None, keys: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One column chosen uniformly at random among the ``True`` entries of each row of ``cand``.

    Uniform because it is the argmax of i.i.d. U(0, 1) keys restricted to the row's candidates.
    Returns ``(column, row_has_candidate)``; ``column`` is meaningless where the row is empty.
    ``keys`` (same shape as ``cand``) may be given to reuse draws; otherwise they are drawn from
    ``generator`` (the global generator when ``None``).
    """
    if keys is None:
        keys = uniform_like(cand.shape, cand.device, generator)
    return keys.masked_fill(~cand, -1.0).argmax(dim=1), cand.any(dim=1)


def uniform_like(shape, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """U(0, 1) draws from ``generator`` (on the generator's own device), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def enumerate_triplets(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(a, p, n)`` with ``pos[a, p]`` and ``neg[a, n]``, in lexicographic order.

    Vectorised in O(number of triplets) memory (no B x M x M tensor): each positive pair (a, p) is
    repeated once per negative of its anchor and paired with that anchor's negatives in order.
    """
    a_pos, p_idx = pos.nonzero(as_tuple=True)
    a_neg, n_idx = neg.nonzero(as_tuple=True)  # row-major: grouped by anchor
    n_per_anchor = neg.sum(1)
    offsets = torch.cumsum(n_per_anchor, 0) - n_per_anchor  # first negative of each anchor in n_idx
    reps = n_per_anchor[a_pos]
    total = int(reps.sum())
    a = torch.repeat_interleave(a_pos, reps, output_size=total)
    p = torch.repeat_interleave(p_idx, reps, output_size=total)
    group_start = torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps, output_size=total)
    within = torch.arange(total, device=pos.device) - group_start
    n = n_idx[torch.repeat_interleave(offsets[a_pos], reps, output_size=total) + within]
    return a, p, n


def triplet_selection(
    a: Tensor,
    p: Tensor,
    n: Tensor,
    num_anchors: int,
    num_candidates: int,
    thresholds: dict[str, Tensor] | None = None,
    stats: dict[str, Tensor] | None = None,
    sq_norms: Tensor | None = None,
) -> PairSelection:
    """A :class:`PairSelection` holding triplets, with the pair masks they imply (for pair losses).
    ``sq_norms``: the batch's squared norms when the candidates are the batch itself (raw embeddings)."""
    pos = torch.zeros(num_anchors, num_candidates, dtype=torch.bool, device=a.device)
    neg = torch.zeros_like(pos)
    pos[a, p] = True
    neg[a, n] = True
    all_stats = basic_stats(pos, neg)
    all_stats["triplets"] = torch.tensor(a.numel(), device=a.device)
    all_stats.update(stats or {})
    return PairSelection(pos, neg, thresholds=thresholds or {}, stats=all_stats, triplets=(a, p, n),
                         self_gram=sq_norms is not None)
