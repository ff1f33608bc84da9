"""Slow, obviously-correct references for the losses and miners: one Python loop per anchor (or per
triplet), written straight from the formulas of the specs (docs/papers/ddtas.md §1-§3, docs/papers/nspa.md
§1 and §4, pytorch-metric-learning's MultiSimilarityMiner / MultiSimilarityLoss and TripletMarginMiner /
TripletMarginLoss semantics). Tests compare the vectorised code against these; the
benchmark times them.

Miners work on Python floats (``tolist``), so their comparisons are done in float64; losses use
per-anchor torch ops so that gradients can be compared too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

INF = float("inf")


# ---- candidate sets -----------------------------------------------------------------------------
def candidate_sets(
    sim: list[list[float]],
    labels: list[int],
    ref_labels: list[int] | None,
    i: int,
    self_threshold: float | None = None,
) -> tuple[list[int], list[int]]:
    """Positive and negative candidates of anchor i. Self excluded by index (same source), or, with
    ``self_threshold``, by value only (same-label candidates with S >= threshold dropped)."""
    ref = labels if ref_labels is None else ref_labels
    pos, neg = [], []
    for j, lj in enumerate(ref):
        if lj != labels[i]:
            neg.append(j)
        elif self_threshold is not None:
            if sim[i][j] < self_threshold:
                pos.append(j)
        elif ref_labels is not None or j != i:
            pos.append(j)
    return pos, neg


def _lists(sim: Tensor, labels: Tensor, ref_labels: Tensor | None):
    return (
        sim.detach().double().tolist(),
        labels.tolist(),
        None if ref_labels is None else ref_labels.tolist(),
    )


def _masks_from_lists(pos_lists, neg_lists, b: int, m: int) -> tuple[Tensor, Tensor]:
    pos = torch.zeros(b, m, dtype=torch.bool)
    neg = torch.zeros(b, m, dtype=torch.bool)
    for i in range(b):
        for j in pos_lists[i]:
            pos[i, j] = True
        for j in neg_lists[i]:
            neg[i, j] = True
    return pos, neg


# ---- pair miners --------------------------------------------------------------------------------
def ref_all_pairs(sim: Tensor, labels: Tensor, ref_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    s, y, r = _lists(sim, labels, ref_labels)
    sets = [candidate_sets(s, y, r, i) for i in range(len(y))]
    return _masks_from_lists([p for p, _ in sets], [n for _, n in sets], *sim.shape)


def ref_ms_mine(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    epsilon: float = 0.1,
    self_threshold: float | None = None,
) -> tuple[Tensor, Tensor]:
    """MS mining (Wang et al. 2019): positive p kept iff S_ip - eps < max_n S_in; negative n kept iff
    S_in + eps > min_p S_ip."""
    s, y, r = _lists(sim, labels, ref_labels)
    pos_l, neg_l = [], []
    for i in range(len(y)):
        P, N = candidate_sets(s, y, r, i, self_threshold)
        min_p = min((s[i][j] for j in P), default=INF)
        max_n = max((s[i][j] for j in N), default=-INF)
        pos_l.append([j for j in P if s[i][j] - epsilon < max_n])
        neg_l.append([j for j in N if s[i][j] + epsilon > min_p])
    return _masks_from_lists(pos_l, neg_l, *sim.shape)


def ref_asms_mine(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    gamma_pos: float = 0.1,
    gamma_neg: float = 0.01,
    self_threshold: float | None = None,
) -> tuple[Tensor, Tensor]:
    """ASMS (DDTAS §1.1): positive p kept iff S_ip < maxN + gamma_pos, negative n iff S_in > minP - gamma_neg."""
    s, y, r = _lists(sim, labels, ref_labels)
    pos_l, neg_l = [], []
    for i in range(len(y)):
        P, N = candidate_sets(s, y, r, i, self_threshold)
        min_p = min((s[i][j] for j in P), default=INF)
        max_n = max((s[i][j] for j in N), default=-INF)
        pos_l.append([j for j in P if s[i][j] < max_n + gamma_pos])
        neg_l.append([j for j in N if s[i][j] > min_p - gamma_neg])
    return _masks_from_lists(pos_l, neg_l, *sim.shape)


def ref_at_asms_mine(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    margin: float = 0.1,
    count_neg_margin: str = "m",
    k: float = 0.5,
    self_threshold: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """AT-ASMS (DDTAS §1.2): count, tolerance, re-mine."""
    s, y, r = _lists(sim, labels, ref_labels)
    gamma_c = margin if count_neg_margin == "m" else margin / 10
    n_pos_all = 0
    n_neg = 0
    for i in range(len(y)):
        P, N = candidate_sets(s, y, r, i, self_threshold)
        n_pos_all += len(P)
        min_p = min((s[i][j] for j in P), default=INF)
        n_neg += sum(1 for j in N if s[i][j] > min_p - gamma_c)
    ratio = n_neg / n_pos_all if n_pos_all > 0 else 0.0
    t = k / (1 + math.exp(-ratio)) if ratio > 1 else 0.0
    gp, gn = margin * (1 + t), (margin / 10) * (1 - t)
    pos, neg = ref_asms_mine(sim, labels, ref_labels, gp, gn, self_threshold)
    return pos, neg, {"ratio": ratio, "tolerance": t, "gamma_pos": gp, "gamma_neg": gn}


# ---- triplet miners -----------------------------------------------------------------------------
def ref_distance(s: float, distance: str) -> float:
    if distance == "cosine":
        return 1.0 - s
    return math.sqrt(max(2.0 - 2.0 * s, 0.0))


def ref_margin_triplets(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    margin: float = 0.2,
    distance: str = "euclidean",
    kind: str = "violating",
) -> list[tuple[int, int, int]]:
    """All (a, p, n) with d(a,n) - d(a,p) < margin ("violating") or 0 < d(a,n) - d(a,p) < margin
    ("semihard"), in lexicographic order."""
    s, y, r = _lists(sim, labels, ref_labels)
    out = []
    for a in range(len(y)):
        P, N = candidate_sets(s, y, r, a)
        for p in P:
            for n in N:
                delta = ref_distance(s[a][n], distance) - ref_distance(s[a][p], distance)
                if delta < margin and (kind == "violating" or delta > 0):
                    out.append((a, p, n))
    return out


def ref_batch_hard(
    sim: Tensor,
    labels: Tensor,
    ref_labels: Tensor | None = None,
    distance: str = "euclidean",
    margin: float | None = None,
) -> list[tuple[int, int, int]]:
    """Per anchor: farthest positive, nearest negative (first index on ties)."""
    s, y, r = _lists(sim, labels, ref_labels)
    out = []
    for a in range(len(y)):
        P, N = candidate_sets(s, y, r, a)
        if not P or not N:
            continue
        best_p = P[0]
        for p in P:
            if ref_distance(s[a][p], distance) > ref_distance(s[a][best_p], distance):
                best_p = p
        best_n = N[0]
        for n in N:
            if ref_distance(s[a][n], distance) < ref_distance(s[a][best_n], distance):
                best_n = n
        d_ap, d_an = ref_distance(s[a][best_p], distance), ref_distance(s[a][best_n], distance)
        if margin is None or d_an - d_ap < margin:
            out.append((a, best_p, best_n))
    return out


# ---- NSPA ---------------------------------------------------------------------------------------
def nspa_schedule_recursive(
    k: int,
    p_init=(1.0, 0.0, 0.0),
    sh_step: float = 0.1,
    h_step: float = 0.01,
    h_max: float = 0.5,
) -> tuple[float, float, float]:
    """The author's ``LinearAnnealingProbabilities`` callback applied k times (nspa.md §1.3)."""
    p_h, p_sh, p_hs = (float(x) for x in p_init)
    for _ in range(k):
        p_sh += sh_step
        p_hs += h_step
        p_hs = min(p_hs, h_max)
        p_h = 1.0 - p_sh - p_hs
        p = [min(max(x, 0.0), 1.0) for x in (p_h, p_sh, p_hs)]
        if sum(p) > 1:
            i = p.index(max(p))
            p[i] -= sum(p) - 1
        p_h, p_sh, p_hs = p
    return p_h, p_sh, p_hs


def _nspa_pick(policy, negs, d_row, ell, keys_row, margin):
    """One NSPA policy for one (a, p) pair; None when the policy has no candidate."""
    if policy == 2:  # hardest: the nearest negative (first on ties), if it violates the margin
        if not negs:
            return None
        best = negs[0]
        for j in negs:
            if d_row[j] < d_row[best]:
                best = j
        return best if ell[best] > 0 else None
    cands = [j for j in negs if ell[j] > 0 and (policy == 0 or ell[j] < margin)]
    if not cands:
        return None
    best = cands[0]  # the candidate with the largest key: a uniform choice
    for j in cands:
        if keys_row[j] > keys_row[best]:
            best = j
    return best


def ref_nspa(
    dist: Tensor,
    labels: Tensor,
    probs,
    margin: float,
    u_pol: Tensor,
    keys: Tensor,
    unordered: bool = True,
    on_empty: str = "skip",
) -> list[tuple[int, int, int, int]]:
    """NSPA per anchor-positive pair (nspa.md §4 loop), replaying the vectorised code's draws:
    ``u_pol[k]`` picks the policy of the k-th pair, the random policies take the candidate with the
    largest ``keys[k, j]`` (a uniform choice). Returns (a, p, n, policy) tuples."""
    d = dist.detach().double().tolist()
    y = labels.tolist()
    u = u_pol.tolist()
    kk = keys.tolist()
    total = sum(probs)
    cut0, cut1 = probs[0] / total, (probs[0] + probs[1]) / total
    out = []
    k = 0
    for a in range(len(y)):
        negs = [j for j in range(len(y)) if y[j] != y[a]]
        for p in range(len(y)):
            if p == a or y[p] != y[a] or (unordered and p < a):
                continue
            ell = {j: d[a][p] - d[a][j] + margin for j in negs}
            uk = u[k] if len(u) > 1 else u[0]
            policy = 0 if uk < cut0 else (1 if uk < cut1 else 2)

            n = _nspa_pick(policy, negs, d[a], ell, kk[k], margin)
            if n is None and on_empty != "skip":
                policy = 0 if on_empty == "fallback_random_hard" else 2
                n = _nspa_pick(policy, negs, d[a], ell, kk[k], margin)
            if n is not None:
                out.append((a, p, n, policy))
            k += 1
    return out


# ---- losses -------------------------------------------------------------------------------------
def _as_t(threshold) -> Tensor:
    """Python numbers as float64 0-d tensors (never rounded through float32)."""
    return threshold if isinstance(threshold, Tensor) else torch.as_tensor(threshold, dtype=torch.float64)


def _lam(threshold) -> tuple:
    t = _as_t(threshold)
    return (t, t) if t.ndim == 0 else (t[0], t[1])


def ref_ms_loss(sim, pos, neg, scale_pos=2.0, scale_neg=40.0, threshold=0.5, weights=None) -> Tensor:
    """(1/B) sum_i (1/a) log(1 + sum_P w e^{-a(S-l)}) + (1/b) log(1 + sum_N w e^{b(S-l)})."""
    lp, ln = _lam(threshold)
    terms = []
    for i in range(sim.shape[0]):
        term = (sim[i] * 0).sum()
        P = pos[i].nonzero().flatten()
        N = neg[i].nonzero().flatten()
        if len(P):
            w = 1.0 if weights is None else weights[i, P]
            term = term + torch.log(1 + torch.sum(w * torch.exp(-scale_pos * (sim[i, P] - lp)))) / scale_pos
        if len(N):
            w = 1.0 if weights is None else weights[i, N]
            term = term + torch.log(1 + torch.sum(w * torch.exp(scale_neg * (sim[i, N] - ln)))) / scale_neg
        terms.append(term)
    return torch.stack(terms).mean()


def ref_mean_softplus_loss(
    sim, pos, neg, scale_pos, scale_neg, threshold, coef_pos, coef_neg, weights=None, neg_shift=0.0
) -> Tensor:
    """(1/B) sum_{i valid} c_p mean_P w log(1+e^{-sp(S-l)}) + c_n mean_N w log(1+e^{sn(S+shift-l)})."""
    lp, ln = _lam(threshold)
    total = (sim * 0).sum()
    for i in range(sim.shape[0]):
        P = pos[i].nonzero().flatten()
        N = neg[i].nonzero().flatten()
        if len(P) == 0 or len(N) == 0:
            continue
        wp = 1.0 if weights is None else weights[i, P]
        wn = 1.0 if weights is None else weights[i, N]
        pos_l = torch.mean(wp * torch.log(1 + torch.exp(-scale_pos * (sim[i, P] - lp))))
        neg_l = torch.mean(wn * torch.log(1 + torch.exp(scale_neg * (sim[i, N] + neg_shift - ln))))
        total = total + coef_pos * pos_l + coef_neg * neg_l
    return total / sim.shape[0]


def ref_soft_contrastive_loss(sim, pos, neg, scale_pos=2.0, scale_neg=40.0, threshold=0.7, **kw) -> Tensor:
    return ref_mean_softplus_loss(
        sim, pos, neg, scale_pos, scale_neg, threshold, 2.0 / scale_pos, 2.0 / scale_neg, **kw
    )


def ref_binomial_loss(sim, pos, neg, scale_pos=2.0, scale_neg=40.0, threshold=0.5, **kw) -> Tensor:
    return ref_mean_softplus_loss(sim, pos, neg, scale_pos, scale_neg, threshold, 1.0, 1.0, **kw)


def ref_contrastive_loss(sim, pos, neg, pos_margin=1.0, threshold=0.5, weights=None) -> Tensor:
    """(1/B) [sum_P w relu(m_pos - S) + sum_N w relu(S - l)]; a (2,) threshold is (m_pos, l)."""
    t = _as_t(threshold).to(sim.dtype)
    if t.ndim == 1:
        pos_margin, lam = t[0], t[1]
    else:
        lam = t
    total = (sim * 0).sum()
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            w = 1.0 if weights is None else weights[i, j]
            if pos[i, j]:
                total = total + w * torch.clamp(pos_margin - sim[i, j], min=0)
            if neg[i, j]:
                total = total + w * torch.clamp(sim[i, j] - lam, min=0)
    return total / sim.shape[0]


def ref_triplet_loss(
    sim, triplets, threshold=0.2, distance="euclidean", squared=False, weights=None
) -> Tensor:
    """sum_t w_t relu(d_ap - d_an + margin) / #{t: relu > 0}; a (2,) threshold gives margin = sum."""
    t = _as_t(threshold).to(sim.dtype)
    margin = t if t.ndim == 0 else t[0] + t[1]

    def dist(x):
        if squared:
            return torch.clamp(2 - 2 * x, min=0)
        if distance == "cosine":
            return 1 - x
        v = torch.clamp(2 - 2 * x, min=0)
        return torch.sqrt(v) if v > 0 else v * 0

    total = (sim * 0).sum()
    active = 0
    for k, (a, p, n) in enumerate(triplets):
        loss = torch.clamp(dist(sim[a, p]) - dist(sim[a, n]) + margin, min=0)
        if loss > 0:
            active += 1
        total = total + (1.0 if weights is None else weights[k]) * loss
    return total / max(active, 1)


def all_triplets_from_masks(pos: Tensor, neg: Tensor) -> list[tuple[int, int, int]]:
    out = []
    for a in range(pos.shape[0]):
        for p in range(pos.shape[1]):
            if pos[a, p]:
                for n in range(pos.shape[1]):
                    if neg[a, n]:
                        out.append((a, p, n))
    return out


# ---- per-anchor training-step references (the official code's structure; used by the benchmark) --
def per_anchor_ms_step(
    emb: Tensor, labels: Tensor, epsilon=0.1, scale_pos=2.0, scale_neg=40.0, threshold=0.5
) -> Tensor:
    """MS mining + MS loss, one anchor at a time with masked_select (like MalongTech's loop, but
    self excluded by index and every anchor kept, as PML does)."""
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.T
    b = sim.shape[0]
    idx = torch.arange(b)
    terms = []
    for i in range(b):
        same = labels == labels[i]
        pos_all = torch.masked_select(sim[i], same & (idx != i))
        neg_all = torch.masked_select(sim[i], ~same)
        term = (sim[i] * 0).sum()
        if len(pos_all) == 0 or len(neg_all) == 0:
            terms.append(term)
            continue
        pos = torch.masked_select(pos_all, pos_all - epsilon < neg_all.max())
        neg = torch.masked_select(neg_all, neg_all + epsilon > pos_all.min())
        if len(pos):
            term = term + torch.log(1 + torch.sum(torch.exp(-scale_pos * (pos - threshold)))) / scale_pos
        if len(neg):
            term = term + torch.log(1 + torch.sum(torch.exp(scale_neg * (neg - threshold)))) / scale_neg
        terms.append(term)
    return torch.stack(terms).mean()


def per_anchor_at_asms_soft_contrastive_step(
    emb: Tensor, labels: Tensor, margin=0.1, scale_pos=2.0, scale_neg=40.0, threshold=0.7
) -> Tensor:
    """AT-ASMS (count with gamma_c = m, tolerance, re-mine) + soft contrastive loss, per anchor, with
    the structure of DDTAS ``SoftCon.py`` (self excluded by index)."""
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.T
    b = sim.shape[0]
    idx = torch.arange(b)
    rows = []
    n_pos_all = 0
    n_neg = 0
    for i in range(b):
        same = labels == labels[i]
        pos_all = torch.masked_select(sim[i], same & (idx != i))
        neg_all = torch.masked_select(sim[i], ~same)
        rows.append((pos_all, neg_all))
        n_pos_all += len(pos_all)
        if len(pos_all):
            n_neg += int((neg_all > pos_all.min().item() - margin).sum())
    ratio = n_neg / n_pos_all if n_pos_all else 0.0
    t = 0.5 / (1 + math.exp(-ratio)) if ratio > 1 else 0.0
    gp, gn = margin * (1 + t), margin / 10 * (1 - t)
    total = (sim * 0).sum()
    for pos_all, neg_all in rows:
        if len(pos_all) == 0 or len(neg_all) == 0:
            continue
        pos = torch.masked_select(pos_all, pos_all < neg_all.max() + gp)
        neg = torch.masked_select(neg_all, neg_all > pos_all.min() - gn)
        if len(pos) == 0 or len(neg) == 0:
            continue
        pos_l = 2.0 / scale_pos * torch.mean(torch.log(1 + torch.exp(-scale_pos * (pos - threshold))))
        neg_l = 2.0 / scale_neg * torch.mean(torch.log(1 + torch.exp(scale_neg * (neg - threshold))))
        total = total + pos_l + neg_l
    return total / b


# ---- test data ----------------------------------------------------------------------------------
def random_batch(
    batch: int, classes: int, dim: int = 16, dtype=torch.float32, seed: int = 0, clustered: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(embeddings, labels, sim) with every class present when batch >= classes; ``clustered`` > 0 pulls
    same-class embeddings together (so that mining thresholds actually bite)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch) % classes
    labels = labels[torch.randperm(batch, generator=g)]
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    if clustered:
        centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
        emb = emb + clustered * centres[labels]
    emb = torch.nn.functional.normalize(emb, dim=1).to(dtype)
    return emb, labels, emb @ emb.T


def angle_embeddings(degrees: list[float], dtype=torch.float64) -> Tensor:
    """2-D unit embeddings at the given angles (as PML's tests do)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1).to(dtype)


def ref_ddtas_ms_py_loss(sim: Tensor, labels: Tensor, margin: float = 0.1, alpha=40.0, beta=2.0, base=0.7):
    """What the released DDTAS ``losses/MS.py`` computes (spec ddtas.md §3 and §6.4/6.5), per anchor:
    positives = same label with S < 1 - 1e-6 (self removed by value); ASMS mining with
    gamma_pos = margin, gamma_neg = margin / 10; the code's relu-and-re-add trick subtracts
    ``margin // 10`` (= 0) instead of ``margin / 10``, so each mined negative enters the loss as
    S + margin / 10; mean-softplus terms with 2/beta, 2/alpha; anchors with an empty set skipped; / B."""
    b = sim.shape[0]
    total = (sim * 0).sum()
    for i in range(b):
        row = sim[i]
        same = labels == labels[i]
        pos_all = row[same & (row < 1 - 1e-6)]
        neg_all = row[~same]
        min_p, max_n = pos_all.min(), neg_all.max()
        pos = pos_all[max_n - pos_all + margin > 0]
        neg = neg_all[neg_all + margin / 10 - min_p > 0]
        neg = (neg + margin / 10 - min_p) - (margin // 10) + min_p  # the bug: + margin/10 survives
        if len(pos) == 0 or len(neg) == 0:
            continue
        total = total + 2.0 / beta * torch.log(1 + torch.exp(-beta * (pos - base))).mean()
        total = total + 2.0 / alpha * torch.log(1 + torch.exp(alpha * (neg - base))).mean()
    return total / b
