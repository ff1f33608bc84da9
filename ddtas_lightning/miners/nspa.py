"""NSPA: negative sampling probability annealing (Kertész, "Deep Metric Learning Using Negative Sampling
Probability Annealing", Sensors 22(19):7579, 2022; spec nspa.md §1 and §4).

Each anchor-positive pair draws one of three negative-selection policies,
``random_hard`` (H), ``semi_hard`` (SH) or ``hardest`` (H*), with probabilities that the schedule
:func:`nspa_probabilities` anneals from (1, 0, 0) to (0, 0.5, 0.5) as the epochs pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.miners.base import BaseMiner
from ddtas_lightning.miners.selection import (
    DISTANCES,
    PairSelection,
    anchor_positive_pairs,
    gram_sq_norms,
    label_masks,
    random_choice_per_row,
    sim_to_distance,
    triplet_selection,
    uniform_like,
)

POLICIES = ("random_hard", "semi_hard", "hardest")
DRAWS = ("pair", "batch")
PAIRS = ("unordered", "ordered")
ON_EMPTY = ("skip", "fallback_random_hard", "fallback_hardest")


def nspa_probabilities(
    epoch: float,
    update_every: float = 10,
    sh_step: float = 0.1,
    h_step: float = 0.01,
    h_max: float = 0.5,
    p_init: Sequence[float] = (1.0, 0.0, 0.0),
) -> tuple[float, float, float]:
    """Policy probabilities ``(P_H, P_SH, P_H*)`` after ``k = floor(epoch / update_every)`` updates.

    The author's callback updates after every ``update_every``-th epoch (0-indexed epochs 9, 19, ...),
    so during 0-indexed epoch ``e`` the probabilities are those after ``floor(e / 10)`` updates.
    With the default start (1, 0, 0) the closed form is
    ``P_H* = min(h_step k, h_max)``, ``P_SH = min(sh_step k, 1 - P_H*)``, ``P_H = max(0, 1 - P_SH - P_H*)``.
    For another ``p_init`` the author's recursive update is applied k times: add the steps, cap
    P_H*, set P_H to the remainder, clip to [0, 1], subtract any excess from the largest entry.
    A pure function of its arguments.
    """
    k = max(0, math.floor(epoch / update_every))
    if tuple(float(x) for x in p_init) == (1.0, 0.0, 0.0):
        p_hardest = min(h_step * k, h_max)
        p_semi = min(sh_step * k, 1.0 - p_hardest)
        return max(0.0, 1.0 - p_semi - p_hardest), p_semi, p_hardest
    p = [float(x) for x in p_init]
    for _ in range(k):
        p[1] += sh_step
        p[2] = min(p[2] + h_step, h_max)
        p[0] = 1.0 - p[1] - p[2]
        p = [min(max(x, 0.0), 1.0) for x in p]
        excess = sum(p) - 1.0
        if excess > 0:
            i = max(range(3), key=lambda j: p[j])
            p[i] -= excess
    return p[0], p[1], p[2]


def nspa_select(
    dist: Tensor,
    pos: Tensor,
    neg: Tensor,
    probs: Sequence[float],
    margin: float,
    generator: torch.Generator | None = None,
    *,
    draw: str = "pair",
    unordered: bool = True,
    on_empty: str = "skip",
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Vectorised NSPA selection on a (B, M) distance matrix. Returns ``(a, p, n, policy, stats)``.

    For every anchor-positive pair (a, p) (``unordered``: a < p only, the author's enumeration) and
    every negative j of a, ``l_j = d(a,p) - d(a,j) + margin``:
      policy 0, random-hard: uniform among ``l_j > 0``;
      policy 1, semi-hard:   uniform among ``0 < l_j < margin``;
      policy 2, hardest:     ``argmin_j d(a,j)`` (the nearest negative, lowest index on ties), if its l > 0.
    The policy is drawn per pair (``draw="pair"``) or once per call (``"batch"``) from ``probs``.
    A pair whose policy has no candidate is skipped (``on_empty="skip"``) or falls back to
    random-hard / hardest. ``policy`` holds the policy that produced each returned triplet.

    Draw order (so a test can replay it): first the policy uniforms ``U_pol`` (one per pair, or one
    per call), then the negative keys ``U_neg`` (pairs x M), both from ``generator``. The policy is
    0 if ``U_pol < P_H``, 1 if ``U_pol < P_H + P_SH``, else 2.
    """
    check_choice("draw", draw, DRAWS)
    check_choice("on_empty", on_empty, ON_EMPTY)
    device = dist.device
    a, p = anchor_positive_pairs(pos, unordered=unordered)
    num_pairs = a.numel()
    p_h, p_sh, p_hs = (float(x) for x in probs)
    total = p_h + p_sh + p_hs
    cut0, cut1 = p_h / total, (p_h + p_sh) / total

    u_pol = uniform_like((num_pairs if draw == "pair" else 1,), device, generator)
    u_pol = u_pol.expand(num_pairs)
    policy = (u_pol >= cut0).long() + (u_pol >= cut1).long()
    keys = uniform_like((num_pairs, dist.shape[1]), device, generator)

    negs = neg[a]
    d_a = dist[a]
    delta = d_a - dist[a, p][:, None]  # d(a, j) - d(a, p) = margin - l_j
    hard = negs & (delta < margin)
    semi = hard & (delta > 0)
    rh_n, rh_ok = random_choice_per_row(hard, keys=keys)
    sh_n, sh_ok = random_choice_per_row(semi, keys=keys)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=device)
    hs_n = torch.where(negs, d_a, inf).argmin(dim=1)
    hs_ok = negs.any(1) & (delta.gather(1, hs_n[:, None]).squeeze(1) < margin)

    choice = torch.stack([rh_n, sh_n, hs_n], 1).gather(1, policy[:, None]).squeeze(1)
    ok = torch.stack([rh_ok, sh_ok, hs_ok], 1).gather(1, policy[:, None]).squeeze(1)
    used = policy.clone()
    if on_empty != "skip":
        fb = 0 if on_empty == "fallback_random_hard" else 2
        fb_n, fb_ok = (rh_n, rh_ok) if fb == 0 else (hs_n, hs_ok)
        retry = ~ok & fb_ok
        choice = torch.where(retry, fb_n, choice)
        used = torch.where(retry, torch.full_like(used, fb), used)
        ok = ok | retry

    stats: dict[str, Tensor] = {}
    for i, name in enumerate(POLICIES):
        stats[f"p_{name}"] = torch.tensor((p_h, p_sh, p_hs)[i], device=device)
        stats[f"drawn_{name}"] = (policy == i).sum()
        stats[f"triplets_{name}"] = ((used == i) & ok).sum()
    stats["candidate_pairs"] = torch.tensor(num_pairs, device=device)
    stats["skipped_pairs"] = (~ok).sum()
    return a[ok], p[ok], choice[ok], used[ok], stats


class NSPAMiner(BaseMiner):
    """NSPA triplet miner: per anchor-positive pair a policy drawn from :func:`nspa_probabilities`
    of the ``epoch`` passed to ``forward``, then that policy's negative (see :func:`nspa_select`).

    Defaults follow the author's code (spec nspa.md §4): margin 0.4, plain Euclidean mining distance
    (here ``sqrt(2 - 2S)`` of the L2-normalised embeddings, i.e. in [0, 2]), updates every 10 epochs,
    steps 0.1 / 0.01, hardest capped at 0.5, unordered pairs, per-pair draw, empty policy = skip.
    With ``ref_labels`` (an external memory) every positive (anchor, memory item) pair is used.
    ``stats``: the basic counts, ``triplets``, ``p_<policy>``, ``drawn_<policy>``,
    ``triplets_<policy>``, ``candidate_pairs``, ``skipped_pairs``.
    """

    def __init__(
        self,
        margin: float = 0.4,
        distance: str = "euclidean",
        update_every: float = 10,
        sh_step: float = 0.1,
        h_step: float = 0.01,
        h_max: float = 0.5,
        p_init: Sequence[float] = (1.0, 0.0, 0.0),
        draw: str = "pair",
        pairs: str = "unordered",
        on_empty: str = "skip",
    ) -> None:
        super().__init__()
        check_choice("miner.distance", distance, DISTANCES)
        check_choice("miner.draw", draw, DRAWS)
        check_choice("miner.pairs", pairs, PAIRS)
        check_choice("miner.on_empty", on_empty, ON_EMPTY)
        p_init = tuple(float(x) for x in p_init)
        if len(p_init) != 3:
            raise ValueError(f"p_init must have 3 entries (random_hard, semi_hard, hardest), got {p_init}")
        self.margin = float(margin)
        self.distance = distance
        self.update_every = float(update_every)
        self.sh_step, self.h_step, self.h_max = float(sh_step), float(h_step), float(h_max)
        self.p_init = p_init
        self.draw, self.pairs, self.on_empty = draw, pairs, on_empty

    def probabilities(self, epoch: float) -> tuple[float, float, float]:
        return nspa_probabilities(
            epoch, self.update_every, self.sh_step, self.h_step, self.h_max, self.p_init
        )

    def mine(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None,
        *,
        epoch: float,
        generator: torch.Generator | None,
    ) -> PairSelection:
        pos, neg = label_masks(labels, ref_labels)
        norms = gram_sq_norms(sim, ref_labels)  # exact for raw embeddings too
        dist = sim_to_distance(sim, self.distance, sq_norms=norms)
        a, p, n, _, stats = nspa_select(
            dist,
            pos,
            neg,
            self.probabilities(epoch),
            self.margin,
            generator,
            draw=self.draw,
            unordered=self.pairs == "unordered" and ref_labels is None,
            on_empty=self.on_empty,
        )
        margin = torch.tensor(self.margin, dtype=sim.dtype, device=sim.device)
        return triplet_selection(
            a, p, n, sim.shape[0], sim.shape[1], thresholds={"margin": margin}, stats=stats, sq_norms=norms
        )
