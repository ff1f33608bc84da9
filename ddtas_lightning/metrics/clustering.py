"""Clustering quality: faiss k-means assignments and normalised mutual information (NMI).

NMI as used in DML papers (and by pytorch-metric-learning's ``AccuracyCalculator``): run k-means on the query
embeddings with as many clusters as there are query classes, then compare cluster assignments ``V`` with class
labels ``U`` (Strehl & Ghosh, JMLR 2002; arithmetic-mean normalisation as in scikit-learn's default)::

    NMI(U, V) = I(U; V) / ((H(U) + H(V)) / 2)
    I(U; V)   = sum_ij (n_ij / n) log(n n_ij / (a_i b_j)),   H(U) = -sum_i (a_i / n) log(a_i / n)

with ``n_ij`` the contingency table, ``a_i`` / ``b_j`` its row / column sums, natural logarithms. Edge cases follow
scikit-learn: both labelings with a single (or no) group -> 1.0; ``I = 0`` otherwise -> 0.0.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _as_numpy_labels(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def normalized_mutual_info(labels_true: Tensor | np.ndarray, labels_pred: Tensor | np.ndarray) -> float:
    """NMI with arithmetic-mean normalisation, computed from the sparse contingency table (no ``C x K`` matrix)."""
    u = _as_numpy_labels(labels_true, "labels_true")
    v = _as_numpy_labels(labels_pred, "labels_pred")
    if len(u) != len(v):
        raise ValueError(f"labels_true has {len(u)} entries but labels_pred has {len(v)}")
    classes, iu = np.unique(u, return_inverse=True)
    clusters, iv = np.unique(v, return_inverse=True)
    if len(classes) == len(clusters) == 1 or len(classes) == len(clusters) == 0:
        return 1.0
    if len(classes) == 1 or len(clusters) == 1:
        return 0.0
    n = float(len(u))
    a = np.bincount(iu).astype(np.float64)
    b = np.bincount(iv).astype(np.float64)
    cells, n_ij = np.unique(iu.astype(np.int64) * len(clusters) + iv, return_counts=True)
    n_ij = n_ij.astype(np.float64)
    row, col = cells // len(clusters), cells % len(clusters)
    terms = (n_ij / n) * (np.log(n_ij) + np.log(n) - np.log(a[row]) - np.log(b[col]))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    mi = max(float(terms.sum()), 0.0)
    if mi == 0.0:
        return 0.0
    h_u = float(-np.sum((a / n) * np.log(a / n)))
    h_v = float(-np.sum((b / n) * np.log(b / n)))
    return mi / ((h_u + h_v) / 2.0)


def kmeans_assign(
    x: Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    niter: int = 20,
) -> Tensor:
    """Cluster ``x`` (N, d) with ``faiss.Kmeans`` (Lloyd, L2, random init) and return (N,) int64 assignments.

    Seeded and deterministic for a given faiss build. Every point is used for training (faiss' default
    subsampling to 256 points per centroid is disabled) and faiss' "too few points per centroid" warning is
    silenced, since DML test sets (e.g. SOP: ~5 images per class) are always in that regime. On CUDA inputs with a
    GPU build of faiss, the assignment index is a ``GpuIndexFlatL2`` pinned to ``x``'s device.
    """
    from ddtas_lightning.metrics.neighbors import quiet_faiss

    faiss = quiet_faiss()
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}")
    if num_clusters == 1:
        return torch.zeros(n, dtype=torch.int64, device=x.device)
    data = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    kmeans = faiss.Kmeans(
        d,
        int(num_clusters),
        niter=int(niter),
        seed=int(seed),
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, -(-n // num_clusters)),
    )
    if x.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # pragma: no cover
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = int(device)
        kmeans.index = faiss.GpuIndexFlatL2(resources, d, config)
        kmeans._gpu_resources = resources  # keep alive as long as the index
    kmeans.train(data)
    _, assign = kmeans.assign(data)
    return torch.from_numpy(assign.astype(np.int64)).to(x.device)


def clustering_nmi(embeddings: Tensor, labels: Tensor, *, seed: int = 0, niter: int = 20) -> float:
    """k-means with k = number of distinct labels on ``embeddings``, then :func:`normalized_mutual_info`."""
    num_classes = int(torch.unique(labels).numel())
    if num_classes == 0:
        return float("nan")
    assign = kmeans_assign(embeddings, num_classes, seed=seed, niter=niter)
    return normalized_mutual_info(labels, assign)


__all__ = ["clustering_nmi", "kmeans_assign", "normalized_mutual_info"]
