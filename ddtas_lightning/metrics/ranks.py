"""Exact ranks of each query's relevant gallery items, without sorting (or even re-scoring) its neighbour lists.

Recall@K, R-Precision and MAP@R only depend on *where the relevant items land* in a query's ranking: R@K on the
rank of the best relevant item, R-Precision and MAP@R on the ranks that are ``<= R``. So instead of putting the
top ``k = max(max K, max R)`` neighbours of every query into their exact order (a float64 re-score of ``k``
candidates per query: ~60 G multiply-adds at SOP scale with ``k = 1000``), this module computes those ranks
directly, in the same canonical order as :func:`ddtas_lightning.metrics.knn` (float64 score descending, then
smaller gallery index; the query's own id excluded):

    rank(p) = 1 + #{items whose float32 similarity exceeds s_p + 2 tol}            (certainly ahead of p)
                + #{items within 2 tol of s_p whose canonical key beats p's}       (decided in float64)

``tol`` bounds the float32 error of one similarity (see :mod:`ddtas_lightning.metrics.neighbors`), so only the
few items inside a relevant item's ``2 tol`` band are re-scored. Two sources of items:

- a float32 candidate list *complete to depth* ``k`` (both backends): counting within the list gives the exact
  rank of every relevant item whose rank is ``<= k`` (everything ahead of such an item is in the list), and a
  value ``> k`` for the others;
- the chunk's full ``(chunk, N)`` similarity block (torch backend): the exact rank of the best relevant item at
  any depth, by two compare-and-count passes. The torch backend uses this for R@K with a large K (e.g. R@1000)
  instead of a top-1000 selection over every row.

Both give the same exact integers, hence identical metrics for the torch and faiss backends.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddtas_lightning.metrics.neighbors import CandidateChunk, KNNIndex, pair_scores

# Candidate lists go to at most this depth (or max R, if larger); deeper R@K ranks come from counting over the
# similarity rows of the (few) queries without a relevant item in their list: cheaper than a top-1000 selection
# on every row (torch) or a k=1000 heap per query (faiss).
_LIST_DEPTH = 32
_BAND_BLOCK_ELEMENTS = 2**22  # (relevant item x band position) comparisons held at once
_NOT_FOUND = torch.iinfo(torch.int64).max


class RelevantRanker:
    """Exact ranks of relevant gallery items (same label, own id excluded) for batches of queries.

    Args:
        index: the gallery's :class:`KNNIndex` (built with the gallery ids, for self-exclusion).
        gallery_labels: (N,) int64 labels of the gallery items, in index order.
    """

    def __init__(self, index: KNNIndex, gallery_labels: Tensor) -> None:
        self.index = index
        self.gallery_labels = gallery_labels
        # gallery positions grouped by label, to list each query's relevant items without an (Q, N) mask
        self._order = torch.argsort(gallery_labels, stable=True)
        self._uniq, counts = torch.unique(gallery_labels, return_counts=True)
        self._start = torch.cumsum(counts, 0) - counts
        self._counts = counts

    def ranks(
        self, query: Tensor, labels: Tensor, ids: Tensor, *, depth: int, first_depth: int
    ) -> tuple[Tensor, Tensor]:
        """Ranks for one batch of queries ((Q, d) embeddings, (Q,) labels and ids).

        Returns ``(ranks, first)``: ``ranks`` (Q, depth) int64, each row the exact ranks ``<= depth`` of the query's
        relevant items in increasing order, padded with a huge value; ``first`` (Q,) int64, the exact rank of the
        best relevant item when it is ``<= first_depth``, otherwise ``first_depth + 1``.
        """
        num_query, device = len(query), query.device
        # lists only as deep as R needs (and small K); deeper R@K ranks come from counting over similarity rows
        list_depth = max(depth, min(first_depth, _LIST_DEPTH), 1)
        ranks = torch.full((num_query, depth), _NOT_FOUND, dtype=torch.int64, device=device)
        first = torch.full((num_query,), first_depth + 1, dtype=torch.int64, device=device)
        keep = list_depth < first_depth and self.index.backend == "torch"
        for chunk in self.index.candidate_chunks(query, list_depth, query_ids=ids, keep_similarities=keep):
            c_labels, c_ids = labels[chunk.rows], ids[chunk.rows]
            c_ranks, c_first = ranks[chunk.rows], first[chunk.rows]  # views: written in place
            for sub_rows, cand_sims, cand_idx in chunk.lists:
                relevant = (cand_idx >= 0) & (
                    self.gallery_labels[cand_idx.clamp_min(0)] == c_labels[sub_rows, None]
                )
                r = _ranks_in_list(
                    chunk.query[sub_rows],
                    self.index.reference,
                    cand_sims,
                    cand_idx,
                    relevant,
                    chunk.tol[sub_rows],
                )
                # only ranks within the list's complete depth are exact; anything deeper is "not found"
                r = torch.sort(r.masked_fill(r > list_depth, _NOT_FOUND), dim=1).values
                if r.shape[1]:  # the best rank before the cut to `depth`: depth is 0 without MAP@R / R-Precision
                    c_first[sub_rows] = torch.where(r[:, 0] <= first_depth, r[:, 0], c_first[sub_rows])
                r = r[:, :depth]
                c_ranks[sub_rows, : r.shape[1]] = r
            if list_depth < first_depth:
                # rows with no relevant item in their list: count over their whole similarity row
                todo = (c_first > first_depth).nonzero().squeeze(1)
                if len(todo):
                    c_first[todo] = self._first_rank_deep(
                        chunk, todo, c_labels[todo], c_ids[todo], first_depth
                    )
        return ranks, first

    def _first_rank_deep(
        self, chunk: CandidateChunk, todo: Tensor, labels: Tensor, ids: Tensor, cap: int
    ) -> Tensor:
        """Exact rank (capped at ``cap + 1``) of the best relevant item of rows ``todo`` of ``chunk``.

        The torch backend already holds the chunk's similarity block; the faiss backend recomputes the rows' float32
        similarities with a torch GEMM (only rows that found no relevant item in their short list).
        """
        out = torch.empty(len(todo), dtype=torch.int64, device=todo.device)
        step = len(todo) if chunk.similarities is not None else self.index.similarity_rows_per_block
        for s in range(0, len(todo), step):
            rows = todo[s : s + step]
            q, tol = chunk.query[rows], chunk.tol[rows]
            if chunk.similarities is not None:
                sims = chunk.similarities[rows]
            else:
                sims = self.index.similarities(q, query_ids=ids[s : s + step])
            deep = self._first_rank_in_block(q, sims, labels[s : s + step], ids[s : s + step], tol, cap)
            out[s : s + step] = deep.clamp_max(cap + 1)
        return out

    def _relevant_positions(self, labels: Tensor, ids: Tensor) -> Tensor:
        """(Q, c) gallery positions with each query's label (own id removed), padded with -1."""
        pos = torch.searchsorted(self._uniq, labels).clamp_max(len(self._uniq) - 1)
        present = self._uniq[pos] == labels
        count = torch.where(present, self._counts[pos], torch.zeros_like(labels))
        width = max(int(count.max()) if len(count) else 0, 1)
        offs = torch.arange(width, device=labels.device)
        flat = (self._start[pos, None] + offs).clamp_max(len(self._order) - 1)
        gallery_pos = self._order[flat]
        valid = offs[None, :] < count[:, None]
        if self.index.reference_ids is not None:
            valid &= self.index.reference_ids[gallery_pos] != ids[:, None]
        return torch.where(valid, gallery_pos, torch.full_like(gallery_pos, -1))

    def _first_rank_in_block(
        self, q: Tensor, sims: Tensor, labels: Tensor, ids: Tensor, tol: Tensor, cap: int
    ) -> Tensor:
        """Exact rank of each row's best relevant item from its full float32 similarity row (> cap: cap + 1)."""
        m, device = len(q), q.device
        rel = self._relevant_positions(labels, ids)
        rel_sims = sims.gather(1, rel.clamp_min(0)).masked_fill(rel < 0, -math.inf)
        top = rel_sims.max(dim=1).values  # float32 similarity of the relevant item that is best in float32
        out = torch.full((m,), cap + 1, dtype=torch.int64, device=device)
        has = torch.isfinite(top)
        # two byte masks over the rows (no float copies): certainly ahead of the float32-best relevant item, and
        # its 2 tol band, which holds the best relevant item in float64
        ahead_mask = sims > (top + 2.0 * tol)[:, None]
        band_mask = sims >= (top - 2.0 * tol)[:, None]
        band_mask &= ~ahead_mask
        # int32 sums: summing a bool mask as int64 first converts the whole mask (8x the bytes)
        above = ahead_mask.sum(dim=1, dtype=torch.int32).long()
        rows = (has & (above < cap)).nonzero().squeeze(1)
        if len(rows) == 0:
            return out
        # bands are a few items, but (many duplicated embeddings) can be a whole row: rows go in groups
        band_size = band_mask.sum(dim=1, dtype=torch.int32)
        group = max(1, _BAND_BLOCK_ELEMENTS // max(int(band_size[rows].max()), 1))
        for g in range(0, len(rows), group):
            sel = rows[g : g + group]
            out[sel] = 1 + above[sel] + self._ahead_in_band(q, band_mask[sel], labels, ids, sel)
        return out

    def _ahead_in_band(self, q: Tensor, band: Tensor, labels: Tensor, ids: Tensor, rows: Tensor) -> Tensor:
        """Per row of ``band`` (rows ``rows`` of the block), the band items whose key beats the best relevant one."""
        device = q.device
        band_rows, band_cols = band.nonzero(as_tuple=True)
        scores = pair_scores(q, self.index.reference, rows[band_rows], band_cols)
        is_rel = self.gallery_labels[band_cols] == labels[rows[band_rows]]
        # the own id is at -inf in sims, so never in a band; excluded explicitly all the same
        if self.index.reference_ids is not None:
            is_rel &= self.index.reference_ids[band_cols] != ids[rows[band_rows]]
        num = len(rows)
        best_score = torch.full((num,), -math.inf, dtype=torch.float64, device=device)
        best_score = best_score.scatter_reduce(0, band_rows[is_rel], scores[is_rel], "amax")
        at_best = is_rel & (scores == best_score[band_rows])
        best_col = torch.full((num,), _NOT_FOUND, dtype=torch.int64, device=device)
        best_col = best_col.scatter_reduce(0, band_rows[at_best], band_cols[at_best], "amin")
        ahead = (scores > best_score[band_rows]) | (
            (scores == best_score[band_rows]) & (band_cols < best_col[band_rows])
        )
        return torch.zeros(num, dtype=torch.int64, device=device).index_add_(0, band_rows, ahead.long())


def _ranks_in_list(
    q: Tensor, reference: Tensor, cand_sims: Tensor, cand_idx: Tensor, relevant: Tensor, tol: Tensor
) -> Tensor:
    """(m, c) ranks of the relevant entries of float32 candidate lists, counting only items in the lists.

    ``cand_sims`` rows are sorted in decreasing order (invalid entries ``-inf`` at the end), so the items certainly
    ahead of an entry and the items in its ``2 tol`` band are two contiguous ranges, found by binary search; only
    band entries are re-scored in float64. ``c`` is the largest number of relevant entries in a row; padding is
    ``_NOT_FOUND``. A rank is exact when it is within the depth to which the list is complete.
    """
    m, width = cand_sims.shape
    device = cand_sims.device
    num_rel = relevant.sum(dim=1)
    c = int(num_rel.max()) if m else 0
    if c == 0:
        return torch.full((m, 0), _NOT_FOUND, dtype=torch.int64, device=device)
    # positions of the relevant entries, packed to the left of each row (stable: in list order)
    rel_pos = torch.sort((~relevant).to(torch.uint8), dim=1, stable=True).indices[:, :c]
    rel_valid = torch.arange(c, device=device)[None, :] < num_rel[:, None]
    s = cand_sims.gather(1, rel_pos)
    band = 2.0 * tol[:, None]
    descending = (-cand_sims).contiguous()  # increasing, so that searchsorted applies
    start = torch.searchsorted(descending, (-(s + band)).contiguous(), right=False)  # #{sim > s + band}
    stop = torch.searchsorted(descending, (-(s - band)).contiguous(), right=True)  # #{sim >= s - band}
    stop = torch.where(rel_valid, stop, start)
    # float64 scores of every list entry that lies in some relevant entry's band
    marks = torch.zeros(m, width + 1, dtype=torch.int32, device=device)
    marks.scatter_add_(1, start, rel_valid.int())
    marks.scatter_add_(1, stop, -rel_valid.int())
    in_band = marks[:, :width].cumsum(dim=1) > 0
    pair_rows, pair_cols = in_band.nonzero(as_tuple=True)
    scores = torch.full((m, width), -math.inf, dtype=torch.float64, device=device)
    scores[pair_rows, pair_cols] = pair_scores(q, reference, pair_rows, cand_idx[pair_rows, pair_cols])
    # count, inside each band, the entries whose (score, index) key beats the relevant entry's
    band_width = max(int((stop - start).max()), 1)
    rows_per_block = max(1, _BAND_BLOCK_ELEMENTS // (c * band_width))
    offs = torch.arange(band_width, device=device)
    ahead = torch.zeros(m, c, dtype=torch.int64, device=device)
    for b in range(0, m, rows_per_block):
        e = min(b + rows_per_block, m)
        pos = start[b:e, :, None] + offs  # (rows, c, band_width)
        inside = pos < stop[b:e, :, None]
        pos = pos.clamp_max(width - 1).view(e - b, -1)
        other_score = scores[b:e].gather(1, pos).view(e - b, c, band_width)
        other_idx = cand_idx[b:e].gather(1, pos).view(e - b, c, band_width)
        own_score = scores[b:e].gather(1, rel_pos[b:e])[:, :, None]
        own_idx = cand_idx[b:e].gather(1, rel_pos[b:e])[:, :, None]
        beats = (other_score > own_score) | ((other_score == own_score) & (other_idx < own_idx))
        ahead[b:e] = (beats & inside).sum(dim=2)
    ranks = 1 + start + ahead
    return torch.where(rel_valid, ranks, torch.full_like(ranks, _NOT_FOUND))


__all__ = ["RelevantRanker"]
