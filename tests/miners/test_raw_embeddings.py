"""Distances of raw (un-normalised) embeddings (issue 16, defect 8): the miners and the triplet loss see
only S = E E^T, and read the squared norms off its diagonal. Checked against distances computed
directly from the embeddings, element by element (a slow, obviously-correct reference)."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.losses import TripletMarginLoss
from ddtas_lightning.miners import BatchHardMiner, RandomHardMiner, SemiHardMiner
from ddtas_lightning.miners.nspa import NSPAMiner
from ddtas_lightning.miners.selection import gram_sq_norms, sim_to_distance


def ref_distance(x: torch.Tensor, y: torch.Tensor, distance: str, squared: bool) -> torch.Tensor:
    out = torch.empty(len(x), len(y), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(len(y)):
            a, b = x[i].double(), y[j].double()
            if distance == "cosine":
                out[i, j] = 1 - (a @ b) / (a.norm() * b.norm())
            else:
                sq = ((a - b) ** 2).sum()
                out[i, j] = sq if squared else sq.sqrt()
    return out


def raw_batch(n: int = 12, d: int = 5, classes: int = 3, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64) * scale)  # ReLU outputs, norms != 1
    emb[0] = emb[1]  # an exact duplicate pair (distance 0)
    labels = torch.arange(n) % classes
    return emb, labels


@pytest.mark.parametrize("distance,squared", [("euclidean", False), ("euclidean", True), ("cosine", False)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_of_raw_embeddings_match_the_reference(distance, squared, seed):
    emb, _ = raw_batch(seed=seed)
    emb = emb + 0.1  # no all-zero ReLU rows (cosine is undefined there)
    sim = emb @ emb.T
    norms = gram_sq_norms(sim, None)
    assert norms is not None
    got = sim_to_distance(sim, distance, squared=squared, sq_norms=norms)
    torch.testing.assert_close(got, ref_distance(emb, emb, distance, squared), rtol=1e-9, atol=1e-7)
    # other candidates (a memory) with their own norms
    ref = emb[:5] * 0.5
    got = sim_to_distance(emb @ ref.T, distance, squared=squared, sq_norms=norms, ref_sq_norms=(ref * ref).sum(1))
    torch.testing.assert_close(got, ref_distance(emb, ref, distance, squared), rtol=1e-9, atol=1e-7)


def test_unit_vectors_keep_the_unit_formula():
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    sim = emb @ emb.T
    assert gram_sq_norms(sim, None) is None  # 2 - 2S, bit for bit as before
    assert gram_sq_norms(sim, torch.arange(6)) is None  # a memory's norms are not on a diagonal
    torch.testing.assert_close(sim_to_distance(sim, "euclidean"), ref_distance(emb, emb, "euclidean", False).float(),
                               rtol=1e-4, atol=1e-3)


def ref_hardest(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> list[tuple[int, int, int]]:
    out = []
    for a in range(len(labels)):
        pos = [j for j in range(len(labels)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(labels)) if labels[j] != labels[a]]
        p = max(pos, key=lambda j: dist[a, j].item())
        n = min(neg, key=lambda j: dist[a, j].item())
        if dist[a, n] - dist[a, p] < margin:
            out.append((a, p, n))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_hard_mines_the_raw_distances(seed):
    emb, labels = raw_batch(seed=seed)
    dist = ref_distance(emb, emb, "euclidean", False)
    sel = BatchHardMiner(margin=1.0)(emb @ emb.T, labels)
    got = sorted(zip(*(t.tolist() for t in sel.triplets)))
    assert got == sorted(ref_hardest(dist, labels, 1.0))
    assert sel.self_gram


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(1e-300).sqrt(), torch.zeros_like(x))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("miner", [SemiHardMiner(margin=2.0), RandomHardMiner(margin=2.0), NSPAMiner(margin=2.0)],
                         ids=["semi_hard", "random_hard", "nspa"])
def test_triplet_loss_on_raw_embeddings_matches_the_reference(miner, squared):
    emb, labels = raw_batch(n=14, seed=5)
    emb.requires_grad_(True)
    sel = miner(emb @ emb.T, labels, generator=torch.Generator().manual_seed(0))
    dist = ref_distance(emb.detach(), emb.detach(), "euclidean", False)
    for a, p, n in zip(*(t.tolist() for t in sel.triplets)):  # the miner saw the true distances
        assert dist[a, n] - dist[a, p] < 2.0, (a, p, n)
    loss = TripletMarginLoss(threshold=2.0, squared=squared)(emb @ emb.T, sel)
    terms = []
    for a, p, n in zip(*(t.tolist() for t in sel.triplets)):
        d_ap, d_an = ((emb[a] - emb[p]) ** 2).sum(), ((emb[a] - emb[n]) ** 2).sum()
        if not squared:
            d_ap, d_an = safe_sqrt(d_ap), safe_sqrt(d_an)  # a duplicate pair has distance 0
        terms.append(torch.relu(d_ap - d_an + 2.0))
    terms = torch.stack(terms)
    ref = terms.sum() / (terms > 0).sum().clamp(min=1)
    assert len(terms) > 0
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    (g,) = torch.autograd.grad(loss, emb)
    (g_ref,) = torch.autograd.grad(ref, emb)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)
