"""Smooth-AP and the NCA objective against slow loops written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ddtas_lightning.losses.retrieval_objectives import nca_loss, smooth_ap_loss


def _problem(seed, n=9, classes=3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(classes, (n,), generator=g)
    return emb @ emb.T, labels


def slow_smooth_ap(sim, labels, tau):
    n, aps = len(labels), []
    sig = lambda x: 1 / (1 + math.exp(-x / tau))  # noqa: E731
    for i in range(n):
        P = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not P:
            continue
        terms = []
        for j in P:
            r_all = 1 + sum(sig(float(sim[i, k] - sim[i, j])) for k in range(n) if k not in (i, j))
            r_pos = 1 + sum(sig(float(sim[i, k] - sim[i, j])) for k in P if k != j)
            terms.append(r_pos / r_all)
        aps.append(sum(terms) / len(P))
    return 1 - sum(aps) / len(aps)


def exact_ap_loss(sim, labels):
    n, aps = len(labels), []
    for i in range(n):
        order = sorted((k for k in range(n) if k != i), key=lambda k: -float(sim[i, k]))
        hits, precisions = 0, []
        for rank, k in enumerate(order, 1):
            if labels[k] == labels[i]:
                hits += 1
                precisions.append(hits / rank)
        if precisions:
            aps.append(sum(precisions) / len(precisions))
    return 1 - sum(aps) / len(aps)


def slow_nca(sim, labels, tau):
    n, terms = len(labels), []
    for i in range(n):
        P = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not P:
            continue
        num = sum(math.exp(float(sim[i, j]) / tau) for j in P)
        den = sum(math.exp(float(sim[i, j]) / tau) for j in range(n) if j != i)
        terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_smooth_ap_and_nca_match_the_formulas(seed, tau):
    sim, labels = _problem(seed)
    assert float(smooth_ap_loss(sim, labels, tau)) == pytest.approx(slow_smooth_ap(sim, labels, tau), rel=1e-10)
    assert float(nca_loss(sim, labels, tau)) == pytest.approx(slow_nca(sim, labels, tau), rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_smooth_ap_tends_to_the_exact_average_precision(seed):
    sim, labels = _problem(seed)
    assert float(smooth_ap_loss(sim, labels, 1e-5)) == pytest.approx(exact_ap_loss(sim, labels), abs=1e-6)


def test_perfect_ranking_and_no_positive():
    labels = torch.tensor([0, 0, 1, 1])
    sim = torch.where(labels[:, None] == labels[None, :], 0.9, -0.5).double()
    assert float(smooth_ap_loss(sim, labels, 1e-4)) == pytest.approx(0.0, abs=1e-12)
    lonely = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    for f in (smooth_ap_loss, nca_loss):
        out = f(lonely, torch.tensor([0, 1, 2]))
        assert out.item() == 0.0 and out.requires_grad
    grad, = torch.autograd.grad(nca_loss(sim.requires_grad_(True), labels, 0.1), sim)
    assert torch.isfinite(grad).all()
