"""Exact k-nearest-neighbour search by inner product (cosine similarity on L2-normalised embeddings).

(The module is ``neighbors`` rather than ``knn`` so that it is not shadowed by the ``knn`` function that
``ddtas_lightning.metrics`` re-exports.)

Two backends return **identical** neighbour lists:

``torch``  chunked over queries: one ``(chunk, N)`` similarity block at a time, never ``N x N``; runs on the
           device of the inputs (CPU or CUDA).
``faiss``  ``faiss.IndexFlatIP`` (exact). On CUDA inputs with a faiss build that has GPU support, a
           ``GpuIndexFlatIP`` pinned to the inputs' device; otherwise the CPU index.

How the two are made identical
------------------------------
A float32 GEMM (MKL, OpenBLAS, cuBLAS, faiss' own kernels) does not give bit-identical similarities across
libraries, and not even across columns of one call: two identical reference vectors can come out one ulp apart
depending on where they sit in a block. Ranking on those raw values would make the order of near-ties and of
duplicated embeddings depend on the backend. So each backend only proposes *candidates* from its float32 search,
and the final ranking is decided on a canonical score:

1. float32 search (torch ``topk`` or faiss ``search``) returns the best ``k + margin`` candidates per query.
2. Every candidate whose float32 similarity is within ``2 * tol`` of the k-th best float32 similarity is kept;
   ``tol`` bounds the float32 rounding error of one inner product (``tol = 2 (2 u_in + d 2^-24) |q| max|r|``, with
   ``u_in`` the input rounding of reduced-precision matmul modes, e.g. TF32), so the true top-k is always among the
   kept candidates. Rows where the candidate list was cut inside that band are searched again, wider.
3. The kept candidates are re-scored in float64 by an element-wise product and a row sum (a computation that does
   not depend on the candidate's position), then sorted by ``(-score, reference index)``: **equal similarity ->
   smaller reference index first**. The returned similarities are these scores cast to float32.

Steps 1-2 are :meth:`KNNIndex.candidate_chunks`; :meth:`KNNIndex.search` adds step 3, and the retrieval metrics
use the same candidate lists and the same float64 scores (:func:`pair_scores`) to compute exact ranks of relevant
items instead (:mod:`ddtas_lightning.metrics.ranks`).

Self-exclusion is by id, never by value: a reference item whose id equals the query's id is never returned,
while a duplicated embedding of a different item is.

``k`` larger than the reference set is **clamped**: the result has ``min(k, N)`` columns. A row with fewer
available items (its own id excluded) is padded at the end with index ``-1`` and similarity ``-inf`` (the
convention faiss itself uses for missing neighbours).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ddtas_lightning.config.validation import check_choice

log = logging.getLogger(__name__)

Backend = Literal["torch", "faiss"]
BACKENDS: tuple[str, ...] = ("torch", "faiss")

# Element budgets of the temporary buffers (not bytes). 2**26 float32 = 256 MiB for a torch similarity block:
# large enough for an efficient GEMM and few (thread-synchronising) small ops per query, far below N x N at SOP
# scale (60,502^2 floats = 14 GiB).
_SIM_BLOCK_ELEMENTS = 2**26
_RESCORE_BLOCK_ELEMENTS = 2**22  # float64 candidate vectors re-scored at once (32 MiB)
_FAISS_CHUNK_ROWS = 4096
_FAISS_GPU_MAX_K = 2048  # faiss' GPU k-selection limit
_MARGIN = 8  # extra candidates fetched beyond k, so that a second, wider search is rarely needed


def quiet_faiss():
    """``import faiss`` without its loader's INFO records (two ``ModuleNotFoundError(... swigfaiss_avx512 /
    avx2 ...)`` lines under Hydra's INFO logging: harmless, the loader falls back to the generic build)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def _float32_input_unit_roundoff(gpu_faiss: bool = False) -> float:
    """Relative rounding of matmul *inputs* under the current float32 matmul precision (0 for true float32)."""
    precision = torch.get_float32_matmul_precision()
    u_in = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}.get(precision, 2.0**-8)
    if gpu_faiss:  # faiss' GPU GEMM may run in TF32 on Ampere and later
        u_in = max(u_in, 2.0**-11)
    return u_in


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


@dataclass
class CandidateChunk:
    """Complete float32 candidate lists of one chunk of queries (see :meth:`KNNIndex.candidate_chunks`).

    ``rows`` selects the chunk in the full query batch of ``num_queries``; ``query`` / ``tol`` are the chunk's
    embeddings and float32 error bounds. ``lists`` holds ``(sub_rows, cand_sims, cand_idx)`` triples covering
    every row of the chunk once: rows whose list had to be widened come in a separate, wider triple.
    ``similarities`` is the chunk's ``(chunk, N)`` float32 block (torch backend, when asked for).
    """

    num_queries: int
    rows: slice
    query: Tensor
    tol: Tensor
    lists: list[tuple[Tensor | slice, Tensor, Tensor]]
    similarities: Tensor | None


def _check_embeddings(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (items x dim), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float32).contiguous()
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_ids(ids: Tensor | None, n: int, name: str, device: torch.device) -> Tensor | None:
    if ids is None:
        return None
    ids = torch.as_tensor(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    return ids.to(device=device, dtype=torch.int64)


class KNNIndex:
    """Exact inner-product k-NN over a fixed reference set; build once, search many query batches.

    Args:
        reference: (N, d) embeddings, L2-normalised for cosine similarity (not normalised here).
        backend: ``"torch"`` (chunked matmul + top-k) or ``"faiss"`` (``IndexFlatIP``).
        reference_ids: optional (N,) integer ids, unique, used for self-exclusion.
        chunk_size: queries per block. ``None``: torch picks ``2**26 // N`` rows (a 256 MiB similarity block),
            faiss 4096 rows (its memory is ``O(chunk x k)``; faiss blocks the database itself).
    """

    def __init__(
        self,
        reference: Tensor,
        *,
        backend: Backend = "torch",
        reference_ids: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> None:
        check_choice("backend", backend, BACKENDS)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.backend = backend
        self.reference = _check_embeddings(reference, "reference")
        self.num_reference, self.dim = self.reference.shape
        if self.num_reference == 0:
            raise ValueError("reference set is empty")
        self.device = self.reference.device
        self.chunk_size = chunk_size
        self.reference_ids = _check_ids(reference_ids, self.num_reference, "reference_ids", self.device)
        if self.reference_ids is not None:
            sorted_ids, order = torch.sort(self.reference_ids)
            if len(sorted_ids) > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
                raise ValueError("reference_ids must be unique")
            self._sorted_ids, self._id_order = sorted_ids, order
        self._max_ref_norm = float(self.reference.norm(dim=1).max())
        self._faiss_index = None
        self._faiss_cpu_index = None
        self._faiss_gpu_resources = None
        self._faiss_on_gpu = False
        if backend == "faiss":
            self._build_faiss()

    # ----------------------------------------------------------------------------------------------- faiss
    def _build_faiss(self) -> None:
        try:
            faiss = quiet_faiss()
        except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
            raise ImportError(
                "backend='faiss' needs faiss (pip install faiss-cpu, or faiss-gpu-cu12)"
            ) from err
        self._faiss = faiss
        if self.reference.is_cuda:
            if (
                hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
            ):  # pragma: no cover - needs GPU
                device = self.reference.device.index
                device = torch.cuda.current_device() if device is None else device
                self._faiss_gpu_resources = faiss.StandardGpuResources()
                config = faiss.GpuIndexFlatConfig()
                config.device = int(device)
                self._faiss_index = faiss.GpuIndexFlatIP(self._faiss_gpu_resources, self.dim, config)
                self._faiss_on_gpu = True
            else:
                log.warning("CUDA embeddings but this faiss build has no GPU support: searching on the CPU")
        if self._faiss_index is None:
            self._faiss_index = faiss.IndexFlatIP(self.dim)
        self._faiss_index.add(_to_numpy(self.reference))

    def _faiss_search(self, query_np: np.ndarray, kk: int) -> tuple[Tensor, Tensor]:
        index = self._faiss_index
        if self._faiss_on_gpu and kk > _FAISS_GPU_MAX_K:  # pragma: no cover - needs GPU
            if self._faiss_cpu_index is None:
                self._faiss_cpu_index = self._faiss.index_gpu_to_cpu(self._faiss_index)
            index = self._faiss_cpu_index
        sims, idx = index.search(query_np, kk)
        return (
            torch.from_numpy(sims).to(self.device),
            torch.from_numpy(idx).to(device=self.device, dtype=torch.int64),
        )

    # ----------------------------------------------------------------------------------------------- search
    def _excluded_column(self, query_ids: Tensor | None) -> Tensor | None:
        """Per query, the reference position carrying the query's id, or -1."""
        if query_ids is None or self.reference_ids is None:
            return None
        pos = torch.searchsorted(self._sorted_ids, query_ids).clamp_max(self.num_reference - 1)
        found = self._sorted_ids[pos] == query_ids
        return torch.where(found, self._id_order[pos], torch.full_like(pos, -1))

    def _tolerance(self, query: Tensor) -> Tensor:
        u_in = _float32_input_unit_roundoff(gpu_faiss=self._faiss_on_gpu)
        per_unit = 2.0 * (2.0 * u_in + self.dim * 2.0**-24)
        return per_unit * query.norm(dim=1) * self._max_ref_norm + 1e-30

    def search(self, query: Tensor, k: int, *, query_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-``min(k, N)`` references of each query by inner product.

        Returns ``(similarities, indices)``, both ``(Q, min(k, N))``: float32 similarities in decreasing order
        (ties: smaller reference index first) and int64 positions in the reference set (``-1`` padding where a
        row has fewer available items). ``query_ids`` (with ``reference_ids`` given at construction) excludes,
        for each query, the reference item with the same id.
        """
        k_out = min(_check_k(k), self.num_reference)
        out_sims = out_idx = None
        for chunk in self.candidate_chunks(query, k, query_ids=query_ids):
            if out_sims is None:
                num_query = chunk.num_queries
                out_sims = torch.full((num_query, k_out), -math.inf, dtype=torch.float32, device=self.device)
                out_idx = torch.full((num_query, k_out), -1, dtype=torch.int64, device=self.device)
            for sub_rows, cand_sims, cand_idx in chunk.lists:
                sims, idx = _rescore(
                    chunk.query[sub_rows], self.reference, cand_sims, cand_idx, k_out, chunk.tol[sub_rows]
                )
                out_sims[chunk.rows][sub_rows] = sims
                out_idx[chunk.rows][sub_rows] = idx
        if out_sims is None:  # no queries
            out_sims = torch.empty(0, k_out, dtype=torch.float32, device=self.device)
            out_idx = torch.empty(0, k_out, dtype=torch.int64, device=self.device)
        return out_sims, out_idx

    def candidate_chunks(
        self, query: Tensor, k: int, *, query_ids: Tensor | None = None, keep_similarities: bool = False
    ) -> Iterator[CandidateChunk]:
        """Float32 candidate lists that are *complete* to depth ``min(k, N)``, one query chunk at a time.

        Steps 1-2 of the module docstring: every reference item that can be among a query's exact top-``k`` is in
        its list, and every item left out is certainly ranked below ``k`` items of the list. Callers derive the
        exact order from the lists (:meth:`search`, :mod:`ddtas_lightning.metrics.ranks`). With
        ``keep_similarities`` the torch backend also hands out the chunk's ``(chunk, N)`` float32 block (own id
        at ``-inf``), for callers that need ranks deeper than ``k``.
        """
        _check_k(k)
        query = _check_embeddings(query, "query")
        if query.shape[1] != self.dim:
            raise ValueError(f"query has dim {query.shape[1]} but reference has dim {self.dim}")
        if query.device != self.device:
            raise ValueError(f"query is on {query.device} but reference is on {self.device}")
        if query_ids is not None and self.reference_ids is None:
            raise ValueError("query_ids given but the index was built without reference_ids")
        query_ids = _check_ids(query_ids, len(query), "query_ids", self.device)
        k_out = min(int(k), self.num_reference)
        num_query = len(query)
        excluded = self._excluded_column(query_ids)
        tol = self._tolerance(query)
        if self.backend == "torch":
            chunk = self.chunk_size or self.similarity_rows_per_block
        else:
            chunk = self.chunk_size or _FAISS_CHUNK_ROWS
        for start in range(0, num_query, chunk):
            rows = slice(start, min(start + chunk, num_query))
            excl = None if excluded is None else excluded[rows]
            q, t = query[rows], tol[rows]
            if self.backend == "torch":
                sim = self._similarity_block(q, excl)
                lists = list(self._search_chunk_torch(sim, k_out, t))
                yield CandidateChunk(num_query, rows, q, t, lists, sim if keep_similarities else None)
            else:
                lists = list(self._search_chunk_faiss(q, k_out, excl, t))
                yield CandidateChunk(num_query, rows, q, t, lists, None)

    @property
    def similarity_rows_per_block(self) -> int:
        """Query rows per ``(rows, N)`` float32 similarity block within the memory budget."""
        return max(1, _SIM_BLOCK_ELEMENTS // self.num_reference)

    def similarities(self, query: Tensor, *, query_ids: Tensor | None = None) -> Tensor:
        """``(Q, N)`` float32 inner products by a torch GEMM (any backend), the query's own id at ``-inf``.

        Callers bound ``Q`` (e.g. by :attr:`similarity_rows_per_block`): this is one block, not a chunked search.
        """
        query_ids = _check_ids(query_ids, len(query), "query_ids", self.device)
        return self._similarity_block(query, self._excluded_column(query_ids))

    def _similarity_block(self, q: Tensor, excl: Tensor | None) -> Tensor:
        """``(chunk, N)`` float32 inner products, the query's own id set to ``-inf``."""
        sim = q @ self.reference.T
        if excl is not None:
            has = excl >= 0
            sim[has.nonzero().squeeze(1), excl[has]] = -math.inf
        return sim

    def _search_chunk_torch(self, sim: Tensor, k: int, tol: Tensor):
        """Yield (row selector, candidate float32 sims, candidate indices) for one chunk's similarity block."""
        n = self.num_reference
        kk = min(n, k + 1 + _MARGIN)
        cand_sims, cand_idx = torch.topk(sim, kk, dim=1, largest=True, sorted=True)
        cand_idx = torch.where(torch.isfinite(cand_sims), cand_idx, torch.full_like(cand_idx, -1))
        incomplete = _incomplete_rows(cand_sims, cand_sims[:, -1], k, tol, kk >= n)
        if not bool(incomplete.any()):
            yield slice(None), cand_sims, cand_idx
            return
        complete = (~incomplete).nonzero().squeeze(1)
        yield complete, cand_sims[complete], cand_idx[complete]
        inc = incomplete.nonzero().squeeze(1)
        threshold = cand_sims[inc, k - 1] - 2.0 * tol[inc]
        need = int((sim[inc] >= threshold[:, None]).sum(dim=1).max())
        more_sims, more_idx = torch.topk(sim[inc], min(n, max(need, kk)), dim=1, largest=True, sorted=True)
        more_idx = torch.where(torch.isfinite(more_sims), more_idx, torch.full_like(more_idx, -1))
        yield inc, more_sims, more_idx

    def _search_chunk_faiss(self, q: Tensor, k: int, excl: Tensor | None, tol: Tensor):
        n = self.num_reference
        q_np = _to_numpy(q)
        rows = torch.arange(len(q), device=self.device)
        kk = min(n, k + 1 + _MARGIN)
        while len(rows):
            raw_sims, idx = self._faiss_search(q_np[_to_numpy_index(rows)], kk)
            last = raw_sims[:, -1].clone()
            invalid = idx < 0
            if excl is not None:
                invalid |= idx == excl[rows][:, None]
            sims = raw_sims.masked_fill(invalid, -math.inf)
            idx = idx.masked_fill(invalid, -1)
            # excluded entries are now -inf: stable re-sort puts them last and keeps faiss' order otherwise
            sims, order = torch.sort(sims, dim=1, descending=True, stable=True)
            idx = idx.gather(1, order)
            incomplete = _incomplete_rows(sims, last, k, tol[rows], kk >= n)
            done = ~incomplete
            if bool(done.any()):
                yield rows[done], sims[done], idx[done]
            rows = rows[incomplete]
            kk = min(n, 2 * kk)


def _incomplete_rows(
    cand_sims: Tensor, last_retrieved: Tensor, k: int, tol: Tensor, exhaustive: bool
) -> Tensor:
    """Rows whose candidate list may have been cut inside the ``2 tol`` band below the k-th similarity.

    Anything not retrieved has a float32 similarity ``<= last_retrieved``; a row is complete when that value lies
    strictly below ``kth - 2 tol`` (or the search already covered every reference item).
    """
    if exhaustive or cand_sims.shape[1] < k:
        return torch.zeros(len(cand_sims), dtype=torch.bool, device=cand_sims.device)
    kth = cand_sims[:, k - 1]
    return torch.isfinite(kth) & (last_retrieved >= kth - 2.0 * tol)


def _rescore(
    q: Tensor, reference: Tensor, cand_sims: Tensor, cand_idx: Tensor, k: int, tol: Tensor
) -> tuple[Tensor, Tensor]:
    """Final ranking of candidate lists on float64 scores; ties -> smaller reference index first.

    ``cand_sims`` is sorted in decreasing order with invalid entries (``-inf``, index -1) at the end. Candidates
    below the ``2 tol`` band of the k-th float32 similarity are dropped before re-scoring.
    """
    m = len(q)
    if m == 0:
        return cand_sims.new_empty(0, k), cand_idx.new_empty(0, k)
    n_ref = len(reference)
    valid = cand_idx >= 0
    if cand_sims.shape[1] >= k:
        kth = cand_sims[:, k - 1]
        keep = valid & (cand_sims >= (kth - 2.0 * tol)[:, None])
    else:
        keep = valid
    width = max(int(keep.sum(dim=1).max()), 1)  # keep is a prefix of each row
    keep, cand_idx = keep[:, :width], cand_idx[:, :width]
    pair_rows, pair_cols = keep.nonzero(as_tuple=True)
    scores = torch.full((m, width), -math.inf, dtype=torch.float64, device=q.device)
    scores[pair_rows, pair_cols] = pair_scores(q, reference, pair_rows, cand_idx[pair_rows, pair_cols])
    # lexicographic sort on (-score, index): sort by index, then a stable sort by score
    key_idx = torch.where(keep, cand_idx, torch.full_like(cand_idx, n_ref))
    key_idx, order = torch.sort(key_idx, dim=1, stable=True)
    scores = scores.gather(1, order)
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    key_idx = key_idx.gather(1, order)
    scores, key_idx = scores[:, :k], key_idx[:, :k]
    found = torch.isfinite(scores)
    key_idx = torch.where(found, key_idx, torch.full_like(key_idx, -1))
    sims = scores.to(torch.float32)
    if width < k:
        pad = k - width
        sims = torch.cat([sims, sims.new_full((m, pad), -math.inf)], dim=1)
        key_idx = torch.cat([key_idx, key_idx.new_full((m, pad), -1)], dim=1)
    return sims, key_idx


def pair_scores(query: Tensor, reference: Tensor, query_rows: Tensor, reference_idx: Tensor) -> Tensor:
    """Canonical float64 scores of the pairs ``(query[query_rows[i]], reference[reference_idx[i]])``.

    Products of two float32 numbers are exact in float64, and each pair is reduced on its own (an element-wise
    product and a sum over the contiguous last dimension), so a score depends only on the two vectors: never on
    the pair's position, the block it is computed in, or the backend that proposed it. Every exact ranking in
    this package (k-NN lists, ranks of relevant items) compares these scores.
    """
    num_pairs, dim = len(query_rows), reference.shape[1]
    out = torch.empty(num_pairs, dtype=torch.float64, device=reference.device)
    block = max(1, _RESCORE_BLOCK_ELEMENTS // dim)
    for s in range(0, num_pairs, block):
        e = min(s + block, num_pairs)
        r64 = reference[reference_idx[s:e]].to(torch.float64)
        out[s:e] = (r64 * query[query_rows[s:e]].to(torch.float64)).sum(dim=-1)
    return out


def _to_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _to_numpy_index(rows: Tensor) -> np.ndarray:
    return rows.detach().cpu().numpy()


def knn(
    query: Tensor,
    reference: Tensor,
    k: int,
    *,
    backend: Backend = "torch",
    query_ids: Tensor | None = None,
    reference_ids: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k-NN of ``query`` (Q, d) in ``reference`` (N, d) by inner product (cosine on unit vectors).

    Returns ``(similarities, indices)`` of shape ``(Q, min(k, N))``: float32 similarities in decreasing order,
    ties broken by the smaller reference index, and int64 positions into ``reference`` (``-1`` / ``-inf`` where a
    row runs out of items). With ``query_ids`` and ``reference_ids`` (integer ids, unique in the reference), a
    reference item whose id equals the query's id is never returned (self-exclusion by index, not by value).
    Both backends return identical indices; see the module docstring for how.
    """
    index = KNNIndex(reference, backend=backend, reference_ids=reference_ids, chunk_size=chunk_size)
    return index.search(query, k, query_ids=query_ids)


__all__ = ["BACKENDS", "Backend", "CandidateChunk", "KNNIndex", "knn", "pair_scores"]
