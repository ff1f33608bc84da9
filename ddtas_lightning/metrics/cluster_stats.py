"""NSPA's cluster statistics: geometric summaries of how well the classes separate in the embedding space.

Kertész, "Deep Metric Learning Using Negative Sampling Probability Annealing", Sensors 2022 (spec
docs/papers/nspa.md §2.2; the author's ``src/ClusterAnalysis.py``). Not silhouette, Davies-Bouldin or
Calinski-Harabasz. All distances are L2 between the embeddings as given (unit vectors for this project's
backbones, so distances lie in [0, 2]). With ``c_i`` the mean of class i, ``n_i`` its size:

- ``avgCentroidDistance``             mean over class pairs i < j of ``||c_i - c_j||``;
- ``avgClusterRadius``                mean_i of ``r_i = max_{x in i} ||c_i - x||``;
- ``avgClosestNegatives``             mean_i of ``min_{x not in i} ||c_i - x||``;
- ``avgPctOfNegativesInCluster``      mean_i of ``s_i / (s_i + n_i)``,
  ``s_i = #{x not in i : ||c_i - x|| <= r_i}``: the share of other-class points among the points inside
  class i's ball (0: no overlap);
- ``avgPctOfNegativesInClusterWithMargin``  the same with ``r_i + margin`` (the author's default 0.2);
- ``avgPositiveDistance`` / ``stdPositiveDistance``  mean / std (ddof 0) of ``||x - y||`` over same-class
  pairs;
- ``avgDistanceOfFurthestPositives``  mean_i of the largest same-class pair distance (the class diameter);
- ``avgDistanceBetweenElements`` / ``stdDistanceBetweenElements``  mean / std over all pairs;
- ``norm*`` (the author's analysis notebook): ``normClosestNegatives``, ``normClusterRadius``,
  ``normDistanceOfFurthestPositives``, ``normPositiveDistance`` = the metric / avgDistanceBetweenElements.

Pairs are unordered (x != y), as in the author's code. With equal class sizes the results equal the
author's; unequal sizes use each class's own n_i. Classes with one point have no positive pair and are left
out of the positive-pair statistics (NaN if no class has two points; NaN centroid distance with one class).
Cost: O(N^2 d) time in row blocks, O(N + k d) memory besides one block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ddtas_lightning.metrics.retrieval import deduplicate_by_index

_BLOCK_ELEMENTS = 2**22  # distances held at once per block
NORMALISED = ("ClosestNegatives", "ClusterRadius", "DistanceOfFurthestPositives", "PositiveDistance")


def _dist(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """Euclidean distances between the rows of a and b (float64, no N x N beyond the block)."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0).sqrt_()


def cluster_statistics(embeddings: Tensor, labels: Tensor, margin: float = 0.2) -> dict[str, float]:
    """The statistics of the module docstring for (N, d) ``embeddings`` with (N,) integer ``labels``."""
    if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
        raise ValueError(
            f"need (N, d) embeddings and (N,) labels, got {tuple(embeddings.shape)}, {tuple(labels.shape)}"
        )
    x = embeddings.detach().to(torch.float64)
    n_items = len(x)
    classes, y = torch.unique(labels.to(x.device), return_inverse=True)
    k = len(classes)
    sizes = torch.bincount(y, minlength=k).to(torch.float64)
    centroids = (
        torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, y, x) / sizes[:, None]
    )
    x_sq, c_sq = (x * x).sum(1), (centroids * centroids).sum(1)
    nan = float("nan")

    # centroid geometry: radius from each point's own centroid, then one pass over (classes x point block)
    cc = _dist(centroids, centroids, c_sq, c_sq)
    iu = torch.triu_indices(k, k, 1, device=x.device)
    centroid_distance = float(cc[iu[0], iu[1]].mean()) if k > 1 else nan
    own = (x - centroids[y]).norm(dim=1)
    radius = torch.zeros(k, dtype=torch.float64, device=x.device).scatter_reduce_(0, y, own, "amax")
    closest_neg = torch.full((k,), math.inf, dtype=torch.float64, device=x.device)
    inside = torch.zeros(k, dtype=torch.float64, device=x.device)
    inside_m = torch.zeros_like(inside)
    block = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for s in range(0, n_items, block):
        d = _dist(centroids, x[s : s + block], c_sq, x_sq[s : s + block])  # (k, b)
        neg = y[None, s : s + block] != torch.arange(k, device=x.device)[:, None]
        closest_neg = torch.minimum(closest_neg, torch.where(neg, d, math.inf).amin(1))
        inside += (neg & (d <= radius[:, None])).sum(1)
        inside_m += (neg & (d <= radius[:, None] + margin)).sum(1)

    # pair geometry: all unordered pairs i < j, in row blocks
    tot = torch.zeros(3, dtype=torch.float64, device=x.device)  # count, sum, sum of squares (all pairs)
    pos = torch.zeros(3, dtype=torch.float64, device=x.device)  # the same over same-class pairs
    diameter = torch.full((k,), -math.inf, dtype=torch.float64, device=x.device)
    cols = torch.arange(n_items, device=x.device)
    block = max(1, _BLOCK_ELEMENTS // max(n_items, 1))
    for s in range(0, n_items, block):
        d = _dist(x[s : s + block], x, x_sq[s : s + block], x_sq)  # (b, N)
        upper = cols[None, :] > cols[s : s + block, None]
        same = upper & (y[s : s + block, None] == y[None, :])
        for acc, mask in ((tot, upper), (pos, same)):
            v = d[mask]
            acc += torch.stack(
                [torch.tensor(float(v.numel()), dtype=torch.float64, device=x.device), v.sum(), (v * v).sum()]
            )
        row_max = torch.where(same, d, -math.inf).amax(1)
        diameter.scatter_reduce_(0, y[s : s + block], row_max, "amax")

    def mean_std(acc: Tensor) -> tuple[float, float]:
        if acc[0] == 0:
            return nan, nan
        m = acc[1] / acc[0]
        return float(m), float((acc[2] / acc[0] - m * m).clamp_min(0.0).sqrt())

    all_mean, all_std = mean_std(tot)
    pos_mean, pos_std = mean_std(pos)
    has_pairs = sizes >= 2
    out = {
        "avgCentroidDistance": centroid_distance,
        "avgClosestNegatives": float(closest_neg.mean()) if k > 1 else nan,
        "avgClusterRadius": float(radius.mean()),
        "avgPctOfNegativesInCluster": float((inside / (inside + sizes)).mean()),
        "avgPctOfNegativesInClusterWithMargin": float((inside_m / (inside_m + sizes)).mean()),
        "avgPositiveDistance": pos_mean,
        "stdPositiveDistance": pos_std,
        "avgDistanceOfFurthestPositives": float(diameter[has_pairs].mean()) if has_pairs.any() else nan,
        "avgDistanceBetweenElements": all_mean,
        "stdDistanceBetweenElements": all_std,
    }
    for name in NORMALISED:
        out[f"norm{name}"] = out[f"avg{name}"] / all_mean if all_mean > 0 else nan
    return out


class ClusterStatistics(Metric):
    """:func:`cluster_statistics` over an evaluation set, as a torchmetrics ``Metric``.

    ``update(embeddings, labels, indices)`` accumulates a batch; states are concatenated across processes
    and de-duplicated by dataset index (DDP padding) before ``compute()``, which returns float32 scalars.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, margin: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = float(margin)
        for name in ("embeddings", "labels", "indices"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor, indices: Tensor) -> None:
        self.embeddings.append(embeddings.detach())
        self.labels.append(labels.detach().long())
        self.indices.append(indices.detach().long())

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.embeddings, list) and len(self.embeddings) == 0:
            raise ValueError("ClusterStatistics.compute() called before any update()")
        emb, labels = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels).long()
        keep = deduplicate_by_index(dim_zero_cat(self.indices).long(), labels=labels)
        stats = cluster_statistics(emb[keep], labels[keep], self.margin)
        return {k: torch.tensor(v, dtype=torch.float32, device=emb.device) for k, v in stats.items()}


__all__ = ["ClusterStatistics", "cluster_statistics"]
