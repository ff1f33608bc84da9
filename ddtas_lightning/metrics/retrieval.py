"""Retrieval metrics for deep metric learning: Recall@K, MAP@R, R-Precision (and NMI), without an N x N matrix.

Definitions (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020; pytorch-metric-learning's
``AccuracyCalculator``), for a query ``q`` with label ``y_q`` and its gallery neighbours ranked by cosine
similarity (the query itself excluded by dataset index, ties broken by the smaller dataset index):

- ``R``            number of gallery items with label ``y_q``, not counting the query itself;
- ``rel(i)``       1 if the i-th neighbour has label ``y_q``;
- ``Recall@K``     1 if ``rel(i) = 1`` for some ``i <= K`` (Oh Song et al., CVPR 2016; equals PML's P@1 for K=1);
- ``R-Precision``  ``(1/R) sum_{i<=R} rel(i)``;
- ``MAP@R``        ``(1/R) sum_{i<=R} P(i) rel(i)`` with ``P(i) = (1/i) sum_{j<=i} rel(j)``;
- ``NMI``          see :mod:`ddtas_lightning.metrics.clustering` (k-means on the query embeddings).

Each k-NN metric is the mean over queries with ``R >= 1``; queries with ``R = 0`` ("lone" queries) are excluded,
as PML does, and reported as ``num_lone_queries`` (metrics are NaN if every query is lone). The metrics only
depend on the ranks of the relevant items (the best one up to max K, the others up to R), which
:mod:`ddtas_lightning.metrics.ranks` computes exactly without putting whole neighbour lists in order; memory is
``O(Q max(max K, max R))`` plus one similarity block, never ``N x N``.

Queries and gallery may differ (In-Shop): items carry ``is_query`` / ``is_gallery`` flags; an item that is both
is excluded from its own neighbour list by its dataset index, while a duplicated embedding of another image is
still retrieved. Rows gathered from several processes are de-duplicated by dataset index first (DDP pads the
last batch with repeated samples) and ordered by dataset index, so results do not depend on how the evaluation
set was split across devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.metrics.clustering import clustering_nmi
from ddtas_lightning.metrics.neighbors import BACKENDS, Backend, KNNIndex
from ddtas_lightning.metrics.ranks import RelevantRanker

DEFAULT_RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)
_OUTPUT_BLOCK_ELEMENTS = 2**22  # (queries x k) neighbour block held at once


def _check_recall_ks(recall_ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(dict.fromkeys(int(k) for k in recall_ks))
    if any(k < 1 for k in ks) or any(isinstance(k, bool) for k in recall_ks):
        raise ValueError(f"recall_ks must be positive ints, got {tuple(recall_ks)}")
    return ks


def deduplicate_by_index(ids: Tensor, *, labels: Tensor | None = None) -> Tensor:
    """Positions that keep one row per distinct id (its first occurrence), ordered by increasing id.

    Raises ``ValueError`` if ``labels`` is given and two rows with the same id disagree on their label (that is not
    DDP padding but a bug in how indices were produced).
    """
    sorted_ids, order = torch.sort(ids, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    keep = order[first]
    if labels is not None and len(keep) < len(ids):
        group = torch.cumsum(first.long(), 0) - 1  # group of each sorted row
        if bool((labels[order] != labels[keep][group]).any()):
            raise ValueError("rows with the same dataset index have different labels")
    return keep


def compute_retrieval_metrics(
    embeddings: Tensor,
    labels: Tensor,
    *,
    ids: Tensor | None = None,
    is_query: Tensor | None = None,
    is_gallery: Tensor | None = None,
    recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
    map_at_r: bool = True,
    r_precision: bool = True,
    nmi: bool = True,
    nmi_seed: int = 0,
    nmi_niter: int = 20,
    backend: Backend = "torch",
    chunk_size: int | None = None,
    normalize: bool = True,
) -> dict[str, float]:
    """Functional form of :class:`RetrievalMetrics` on one set of items.

    Args:
        embeddings: (N, d) embeddings of every item (queries and gallery together).
        labels: (N,) integer class labels.
        ids: (N,) integer dataset indices. Rows with the same id are de-duplicated (first kept) and self-exclusion
            is by id. ``None``: rows are distinct items with ids ``0..N-1``.
        is_query, is_gallery: (N,) bool roles; ``None`` means every item (query == gallery, self excluded).
        recall_ks: the K of ``R@K``. map_at_r / r_precision / nmi: which other metrics to compute.
        nmi_seed, nmi_niter: k-means seed and iterations. backend, chunk_size: see :class:`KNNIndex`.
        normalize: L2-normalise embeddings first (cosine similarity); set False for already unit vectors.

    Returns a dict with ``R@K`` for each K, then ``MAP@R``, ``R-Precision``, ``NMI`` (those enabled),
    ``num_queries`` and ``num_lone_queries`` (queries without any relevant gallery item, excluded from the k-NN
    metrics).
    """
    recall_ks = _check_recall_ks(recall_ks)
    items = _prepare_items(embeddings, labels, ids, is_query, is_gallery, backend, normalize)
    out: dict[str, float] = {}
    num_eval = int(items.not_lone.sum())
    hits = dict.fromkeys(recall_ks, 0)
    rp_sum = map_sum = 0.0
    if bool(recall_ks) or map_at_r or r_precision:
        for _, r_rows, ranks, first, depth in _relevant_ranks(
            items, max(recall_ks, default=0), map_at_r or r_precision, backend, chunk_size
        ):
            for kk in recall_ks:
                hits[kk] += int((first <= kk).sum())
            within = ranks <= r_rows[:, None]  # ranks are increasing along a row
            if r_precision:
                rp_sum += float((within.sum(dim=1).double() / r_rows).sum())
            if map_at_r:
                map_sum += float(_average_precision_at_r(ranks, r_rows, depth).sum())
    emb, q_pos, q_labels = items.emb, items.q_pos, items.q_labels
    nan = float("nan")
    for kk in recall_ks:
        out[f"R@{kk}"] = hits[kk] / num_eval if num_eval else nan
    if map_at_r:
        out["MAP@R"] = map_sum / num_eval if num_eval else nan
    if r_precision:
        out["R-Precision"] = rp_sum / num_eval if num_eval else nan
    if nmi:
        q_emb = emb if len(q_pos) == len(emb) else emb[q_pos]
        out["NMI"] = clustering_nmi(q_emb, q_labels, seed=nmi_seed, niter=nmi_niter)
    out["num_queries"] = float(len(q_pos))
    out["num_lone_queries"] = float(len(q_pos) - num_eval)
    return out


class _Items:
    """Evaluation items after de-duplication by id, normalisation and role split (see
    :func:`compute_retrieval_metrics`); ``r`` is each query's number of relevant gallery items."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _prepare_items(embeddings, labels, ids, is_query, is_gallery, backend, normalize) -> _Items:
    check_choice("backend", backend, BACKENDS)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {tuple(embeddings.shape)}")
    n = len(embeddings)
    device = embeddings.device

    def _flags(x: Tensor | None, name: str) -> Tensor:
        if x is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        x = torch.as_tensor(x, device=device)
        if x.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
        return x.bool()

    labels = torch.as_tensor(labels, device=device)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    labels = labels.long()
    is_query, is_gallery = _flags(is_query, "is_query"), _flags(is_gallery, "is_gallery")
    if ids is None:
        ids = torch.arange(n, device=device)
    else:
        ids = torch.as_tensor(ids, device=device)
        if ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), got {tuple(ids.shape)}")
        ids = ids.long()
        keep = deduplicate_by_index(ids, labels=labels)
        # skip the copy when the rows are already unique and sorted by index
        if not torch.equal(keep, torch.arange(n, device=device)):
            embeddings, labels, ids = embeddings[keep], labels[keep], ids[keep]
            is_query, is_gallery = is_query[keep], is_gallery[keep]

    emb = embeddings.detach().to(torch.float32)
    if normalize:
        emb = F.normalize(emb, dim=1)
    q_pos = is_query.nonzero().squeeze(1)
    g_pos = is_gallery.nonzero().squeeze(1)
    if len(q_pos) == 0:
        raise ValueError("no query items (is_query is all False)")
    q_labels, q_ids = labels[q_pos], ids[q_pos]
    g_labels, g_ids = labels[g_pos], ids[g_pos]
    # gallery embeddings without a copy when every item is in the gallery (the usual query == gallery case)
    g_emb = emb if len(g_pos) == len(emb) else emb[g_pos]

    # R = gallery items with the query's label, minus the query itself when it is in the gallery.
    if len(g_pos):
        uniq, counts = torch.unique(g_labels, return_counts=True)
        pos = torch.searchsorted(uniq, q_labels).clamp_max(len(uniq) - 1)
        r = torch.where(uniq[pos] == q_labels, counts[pos], torch.zeros_like(q_labels))
    else:
        r = torch.zeros_like(q_labels)
    r = r - is_gallery[q_pos].long()
    return _Items(emb=emb, ids=ids, q_pos=q_pos, q_labels=q_labels, q_ids=q_ids, g_pos=g_pos, g_emb=g_emb,
                  g_labels=g_labels, g_ids=g_ids, r=r, not_lone=r > 0)


def _relevant_ranks(items: _Items, first_depth: int, need_r_ranks: bool, backend, chunk_size):
    """Blocks of the non-lone queries: ``(rows, R, ranks, first, depth)`` with ``rows`` positions in
    ``items.q_pos``, the exact ranks ``<= depth`` of their relevant items (``depth`` = max R when
    ``need_r_ranks``, else 0) and the rank of the best one up to ``first_depth``."""
    eval_rows = items.not_lone.nonzero().squeeze(1)
    if len(eval_rows) == 0:
        return
    r, emb, q_pos = items.r, items.emb, items.q_pos
    # ranks <= R decide MAP@R and R-Precision; the best relevant item's rank (up to max K) decides R@K
    depth = int(r[eval_rows].max()) if need_r_ranks else 0
    index = KNNIndex(items.g_emb, backend=backend, reference_ids=items.g_ids, chunk_size=chunk_size)
    ranker = RelevantRanker(index, items.g_labels)
    block = max(1, _OUTPUT_BLOCK_ELEMENTS // max(depth, first_depth, 1))
    for start in range(0, len(eval_rows), block):
        rows = eval_rows[start : start + block]
        item_rows = q_pos[rows]
        contiguous = len(item_rows) == int(item_rows[-1] - item_rows[0]) + 1  # a slice: no copy
        q_emb = emb[int(item_rows[0]) : int(item_rows[-1]) + 1] if contiguous else emb[item_rows]
        ranks, first = ranker.ranks(
            q_emb, items.q_labels[rows], items.q_ids[rows], depth=depth, first_depth=first_depth
        )
        yield rows, r[rows], ranks, first, depth


def _average_precision_at_r(ranks: Tensor, r_rows: Tensor, depth: int) -> Tensor:
    """Per query ``AP@R = (1/R) sum_{j: rho_j <= R} j / rho_j`` (the j-th relevant item at rank rho_j), float64."""
    within = ranks <= r_rows[:, None]
    j = torch.arange(1, depth + 1, device=ranks.device, dtype=torch.float64)
    prec = torch.where(within, j / ranks.double(), 0.0)
    return prec.sum(dim=1) / r_rows


def per_query_metrics(
    embeddings: Tensor,
    labels: Tensor,
    *,
    ids: Tensor | None = None,
    is_query: Tensor | None = None,
    is_gallery: Tensor | None = None,
    backend: Backend = "torch",
    chunk_size: int | None = None,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """R@1 and AP@R of every non-lone query (the terms whose means are ``R@1`` and ``MAP@R`` of
    :func:`compute_retrieval_metrics`, from the same exact ranks).

    Returns (Q',) tensors for the Q' queries with ``R >= 1``, by increasing dataset index: ``ids``,
    ``labels``, ``R``, ``R@1`` (1.0 / 0.0) and ``MAP@R`` (float64).
    """
    items = _prepare_items(embeddings, labels, ids, is_query, is_gallery, backend, normalize)
    parts = [(rows, (first <= 1).double(), _average_precision_at_r(ranks, r_rows, depth))
             for rows, r_rows, ranks, first, depth in _relevant_ranks(items, 1, True, backend, chunk_size)]
    device = items.emb.device
    rows = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=device)
    hit = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    ap = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    return {"ids": items.q_ids[rows], "labels": items.q_labels[rows], "R": items.r[rows], "R@1": hit, "MAP@R": ap}


def per_class_metrics(per_query: dict[str, Tensor]) -> dict[int, dict[str, float]]:
    """Mean R@1 and MAP@R over each class's (non-lone) queries: ``{label: {"R@1", "MAP@R", "num_queries"}}``."""
    out: dict[int, dict[str, float]] = {}
    labels = per_query["labels"].cpu()
    uniq, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    for name in ("R@1", "MAP@R"):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, per_query[name].cpu().double())
        for c, s, n in zip(uniq.tolist(), sums.tolist(), counts.tolist()):
            out.setdefault(int(c), {"num_queries": float(n)})[name] = s / n
    return out


class RetrievalMetrics(Metric):
    """Recall@K, MAP@R, R-Precision and NMI over an evaluation set, as a torchmetrics ``Metric``.

    ``update(embeddings, labels, indices, is_query=None, is_gallery=None)`` accumulates one batch: (B, d)
    embeddings, (B,) integer labels, (B,) dataset indices, optional (B,) bool roles (``None``: both query and
    gallery). States are lists concatenated across processes (``dist_reduce_fx="cat"``); ``compute()``
    de-duplicates by dataset index and returns the dict of :func:`compute_retrieval_metrics` as float32 scalars:
    ``R@1``, ``R@2``, ..., ``MAP@R``, ``R-Precision``, ``NMI``, ``num_queries``, ``num_lone_queries``.

    Memory: the embeddings, one ``(chunk, N_gallery)`` float32 similarity block (256 MiB; torch backend, and the
    faiss backend for the rare queries whose best relevant item is deeper than its short candidate list),
    candidate lists of depth ``max(largest class count, min(max K, 32))`` and ``(Q, largest class count)`` ranks;
    never ``N x N``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    embeddings: list[Tensor] | Tensor
    labels: list[Tensor] | Tensor
    indices: list[Tensor] | Tensor
    is_query: list[Tensor] | Tensor
    is_gallery: list[Tensor] | Tensor

    def __init__(
        self,
        recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
        backend: Backend = "torch",
        map_at_r: bool = True,
        r_precision: bool = True,
        nmi: bool = True,
        nmi_seed: int = 0,
        nmi_niter: int = 20,
        normalize: bool = True,
        chunk_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("backend", backend, BACKENDS)
        self.recall_ks = _check_recall_ks(recall_ks)
        self.backend = backend
        self.map_at_r = map_at_r
        self.r_precision = r_precision
        self.nmi = nmi
        self.nmi_seed = nmi_seed
        self.nmi_niter = nmi_niter
        self.normalize = normalize
        self.chunk_size = chunk_size
        for name in ("embeddings", "labels", "indices", "is_query", "is_gallery"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Tensor,
        is_query: Tensor | None = None,
        is_gallery: Tensor | None = None,
    ) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {tuple(embeddings.shape)}")
        b = len(embeddings)
        for name, x in (
            ("labels", labels),
            ("indices", indices),
            ("is_query", is_query),
            ("is_gallery", is_gallery),
        ):
            if x is not None and tuple(x.shape) != (b,):
                raise ValueError(f"{name} must have shape ({b},), got {tuple(x.shape)}")
        ones = torch.ones(b, dtype=torch.uint8, device=embeddings.device)
        self.embeddings.append(embeddings.detach())
        self.labels.append(labels.detach().long())
        self.indices.append(indices.detach().long())
        # roles are stored as uint8: all_gather of bool tensors is not supported by every backend
        self.is_query.append(ones if is_query is None else is_query.detach().to(torch.uint8))
        self.is_gallery.append(ones if is_gallery is None else is_gallery.detach().to(torch.uint8))

    def gathered(self) -> dict[str, Tensor]:
        """The items accumulated by every process, one row per dataset index (by increasing index):
        ``embeddings``, ``labels``, ``indices``, ``is_query``, ``is_gallery`` (bool). Call on every rank."""
        with self.sync_context(should_sync=True, should_unsync=True):
            states = {name: dim_zero_cat(getattr(self, name))
                      for name in ("embeddings", "labels", "indices", "is_query", "is_gallery")}
        keep = deduplicate_by_index(states["indices"].long(), labels=states["labels"].long())
        out = {name: value[keep] for name, value in states.items()}
        out["is_query"], out["is_gallery"] = out["is_query"].bool(), out["is_gallery"].bool()
        return out

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.embeddings, list) and len(self.embeddings) == 0:
            raise ValueError("RetrievalMetrics.compute() called before any update()")
        embeddings = dim_zero_cat(self.embeddings)
        result = compute_retrieval_metrics(
            embeddings,
            dim_zero_cat(self.labels).long(),
            ids=dim_zero_cat(self.indices).long(),
            is_query=dim_zero_cat(self.is_query).bool(),
            is_gallery=dim_zero_cat(self.is_gallery).bool(),
            recall_ks=self.recall_ks,
            map_at_r=self.map_at_r,
            r_precision=self.r_precision,
            nmi=self.nmi,
            nmi_seed=self.nmi_seed,
            nmi_niter=self.nmi_niter,
            backend=self.backend,
            chunk_size=self.chunk_size,
            normalize=self.normalize,
        )
        return {
            key: torch.tensor(value, dtype=torch.float32, device=embeddings.device)
            for key, value in result.items()
        }


__all__ = [
    "DEFAULT_RECALL_KS",
    "RetrievalMetrics",
    "compute_retrieval_metrics",
    "deduplicate_by_index",
    "per_class_metrics",
    "per_query_metrics",
]
