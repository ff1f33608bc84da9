"""Slow reference implementations, written from the definitions: full N x N scores and per-query Python loops.

Scores are float64 element-wise products summed per pair (independent of the pair's position, unlike a GEMM,
where two identical columns can differ by an ulp), so exact ties between duplicated embeddings stay exact.
"""

from __future__ import annotations

import math

import torch


def pair_scores(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(Q, N) float64 inner products of the float32 values, computed per pair."""
    q64 = q.to(torch.float32).to(torch.float64)
    r64 = r.to(torch.float32).to(torch.float64)
    return (q64[:, None, :] * r64[None, :, :]).sum(dim=-1)


def brute_knn(q, r, k, query_ids=None, reference_ids=None):
    """Neighbour lists sorted by (-score, reference index), own id excluded, padded with -1 to min(k, N)."""
    scores = pair_scores(q, r).tolist()
    n = len(r)
    k_out = min(k, n)
    qids = None if query_ids is None else [int(x) for x in query_ids]
    rids = None if reference_ids is None else [int(x) for x in reference_ids]
    out = []
    for i in range(len(q)):
        row_scores = scores[i]
        cand = [j for j in range(n) if qids is None or rids[j] != qids[i]]
        cand.sort(key=lambda j: (-row_scores[j], j))
        row = cand[:k_out]
        out.append(row + [-1] * (k_out - len(row)))
    return torch.tensor(out, dtype=torch.int64).reshape(len(q), k_out)


def brute_retrieval(embeddings, labels, ids=None, is_query=None, is_gallery=None, recall_ks=(1, 2, 4, 8)):
    """Every k-NN metric from its definition; lone queries excluded and counted."""
    n = len(embeddings)
    ids = list(range(n)) if ids is None else [int(i) for i in ids]
    is_query = [True] * n if is_query is None else [bool(x) for x in is_query]
    is_gallery = [True] * n if is_gallery is None else [bool(x) for x in is_gallery]
    first: dict[int, int] = {}
    for pos, i in enumerate(ids):
        first.setdefault(i, pos)
    rows = [first[i] for i in sorted(first)]  # one row per dataset index, by increasing index
    emb = torch.nn.functional.normalize(embeddings[rows].to(torch.float32), dim=1)
    lab = [int(labels[p]) for p in rows]
    item_id = [ids[p] for p in rows]
    qry = [is_query[p] for p in rows]
    gal = [is_gallery[p] for p in rows]
    scores = pair_scores(emb, emb).tolist()
    sums = {f"R@{k}": 0.0 for k in recall_ks} | {"MAP@R": 0.0, "R-Precision": 0.0}
    num_q = num_lone = 0
    for i in range(len(rows)):
        if not qry[i]:
            continue
        num_q += 1
        gallery = [j for j in range(len(rows)) if gal[j] and item_id[j] != item_id[i]]
        r = sum(lab[j] == lab[i] for j in gallery)
        if r == 0:
            num_lone += 1
            continue
        ranked = sorted(gallery, key=lambda j: (-scores[i][j], j))
        rel = [lab[j] == lab[i] for j in ranked]
        for k in recall_ks:
            sums[f"R@{k}"] += float(any(rel[:k]))
        sums["R-Precision"] += sum(rel[:r]) / r
        ap, correct = 0.0, 0
        for pos in range(r):
            if rel[pos]:
                correct += 1
                ap += correct / (pos + 1)
        sums["MAP@R"] += ap / r
    num_eval = num_q - num_lone
    out = {key: (value / num_eval if num_eval else math.nan) for key, value in sums.items()}
    out["num_queries"] = float(num_q)
    out["num_lone_queries"] = float(num_lone)
    return out


def brute_nmi(labels_true, labels_pred) -> float:
    """NMI = I(U;V) / mean(H(U), H(V)) from explicit counts (natural log)."""
    u = [int(x) for x in labels_true]
    v = [int(x) for x in labels_pred]
    n = len(u)
    cu: dict[int, int] = {}
    cv: dict[int, int] = {}
    cuv: dict[tuple[int, int], int] = {}
    for a, b in zip(u, v):
        cu[a] = cu.get(a, 0) + 1
        cv[b] = cv.get(b, 0) + 1
        cuv[a, b] = cuv.get((a, b), 0) + 1
    if len(cu) == len(cv) == 1:
        return 1.0
    mi = sum(c / n * math.log(n * c / (cu[a] * cv[b])) for (a, b), c in cuv.items())
    h_u = -sum(c / n * math.log(c / n) for c in cu.values())
    h_v = -sum(c / n * math.log(c / n) for c in cv.values())
    if mi <= 1e-15:
        return 0.0
    return mi / ((h_u + h_v) / 2)


def unit_angles(degrees) -> torch.Tensor:
    """2-D unit vectors at the given angles (degrees)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1).to(torch.float32)
