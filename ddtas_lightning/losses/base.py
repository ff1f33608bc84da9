"""Base class of all losses. Pure tensor code: no Lightning, no Hydra."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.config.validation import as_float
from ddtas_lightning.miners.selection import PairSelection, label_masks


class MetricLoss(nn.Module):
    """``forward(sim, selection, threshold=None, weights=None) -> scalar``.

    sim: (B, M) cosine similarities with a graph.
    selection: the miner's :class:`PairSelection` (``PairSelection.all_pairs`` for no mining).
    threshold: the loss threshold lambda as a tensor, so a policy can differentiate through it:
        0-d (one lambda), shape (2,) = (lambda_pos, lambda_neg), or one lambda per anchor row: shape
        (B, 1), or (B,) when B != 2 (a (2,) tensor always means (pos, neg), so a per-anchor threshold
        of a 2-row batch must be given as (B, 1)); it applies to every pair of its row, positive or
        negative. ``None`` uses ``self.threshold``.
    weights: optional (B, M) per-pair weights (MMSI / pair-weight policies); how they enter is
        documented per loss.
    The result is exactly zero, with a graph to ``sim``, when nothing is selected; never NaN.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = as_float("loss.threshold", threshold)

    def resolve_threshold(self, sim: Tensor, threshold: Tensor | float | None) -> tuple[Tensor, Tensor]:
        """(lambda_pos, lambda_neg) in ``sim``'s dtype/device: 0-d tensors, or both the same (B, 1)
        column for a per-anchor threshold, which broadcasts along the rows of the (B, M) ``sim``."""
        if threshold is None:
            threshold = self.threshold
        if isinstance(threshold, Tensor):
            t = threshold.to(device=sim.device, dtype=sim.dtype)
        else:  # straight to sim's dtype: a float64 loss must not see lambda rounded to float32
            t = torch.as_tensor(threshold, dtype=sim.dtype, device=sim.device)
        if t.ndim == 0:
            return t, t
        if is_pos_neg(t):
            return t[0], t[1]
        rows = sim.shape[0]
        if t.shape in ((rows,), (rows, 1)):
            col = t.reshape(rows, 1)
            return col, col
        raise ValueError(
            f"threshold must be a scalar, a (pos, neg) pair or one per anchor row ((B,) or (B, 1), "
            f"B = {rows}), got shape {tuple(t.shape)}"
        )

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


def is_pos_neg(threshold: Tensor | float | None) -> bool:
    """Whether a threshold is the (lambda_pos, lambda_neg) pair: shape (2,), whatever B is."""
    return threshold is not None and tuple(torch.as_tensor(threshold).shape) == (2,)


def zero_loss(sim: Tensor) -> Tensor:
    """A zero that keeps the graph (DDP needs every parameter to receive a gradient).

    ``(sim * 0).sum()`` rather than ``sim.sum() * 0``: the sum of a large fp16 matrix can overflow to
    inf, and ``inf * 0`` is NaN.
    """
    return (sim * 0.0).sum()


# ---- helpers shared by the concrete losses -----------------------------------------------------
def upcast(sim: Tensor) -> Tensor:
    """float16 / bfloat16 similarities are computed in float32 (the loss is then returned in float32);
    float32 / float64 are left alone."""
    return sim.float() if sim.dtype in (torch.float16, torch.bfloat16) else sim


def pair_weights(weights: Tensor | None, sim: Tensor) -> Tensor | None:
    """Check that per-pair weights are (B, M) like ``sim`` and cast them to its dtype/device."""
    if weights is None:
        return None
    if weights.shape != sim.shape:
        raise ValueError(f"weights must have the shape of sim {tuple(sim.shape)}, got {tuple(weights.shape)}")
    return weights.to(device=sim.device, dtype=sim.dtype)


def masked_log1p_sum_exp(x: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Row-wise ``log(1 + sum_{j: mask_ij} w_ij exp(x_ij))``, stable for large x, 0 for an empty row.

    Computed as ``c + log(exp(-c) + sum w exp(x - c))`` with ``c = max(0, max_j x_ij)`` (detached: the
    value does not depend on c). Unselected entries are filled with -inf *before* the exponential, so
    their gradient is exactly 0 (never ``0 * inf``); weights enter as factors (not ``log w``), so the
    gradient w.r.t. a zero weight is finite. Weights must be >= 0.
    """
    xm = x.masked_fill(~mask, float("-inf"))
    c = xm.amax(dim=1, keepdim=True).clamp(min=0.0).detach()
    e = torch.exp(xm - c)
    if weights is not None:
        e = e * weights.masked_fill(~mask, 0.0)
    c = c.squeeze(1)
    return c + torch.log(torch.exp(-c) + e.sum(dim=1))


__all__ = ["MetricLoss", "is_pos_neg", "zero_loss", "label_masks"]
