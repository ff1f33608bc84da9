"""Evaluation metrics: exact k-NN (torch chunked or faiss), retrieval metrics and clustering NMI.

Pure tensor code (torch, numpy, faiss, torchmetrics); importable without Lightning or Hydra.
"""

from ddtas_lightning.metrics.clustering import clustering_nmi, kmeans_assign, normalized_mutual_info
from ddtas_lightning.metrics.neighbors import BACKENDS, KNNIndex, knn
from ddtas_lightning.metrics.retrieval import (
    DEFAULT_RECALL_KS,
    RetrievalMetrics,
    compute_retrieval_metrics,
    deduplicate_by_index,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_RECALL_KS",
    "KNNIndex",
    "RetrievalMetrics",
    "clustering_nmi",
    "compute_retrieval_metrics",
    "deduplicate_by_index",
    "kmeans_assign",
    "knn",
    "normalized_mutual_info",
]
