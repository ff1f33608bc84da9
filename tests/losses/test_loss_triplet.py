"""TripletMarginLoss against a per-triplet reference and PML's TripletMarginLoss."""

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from ddtas_lightning.losses import TripletMarginLoss
from ddtas_lightning.miners import (
    AllPairsMiner,
    BatchHardMiner,
    MultiSimilarityMiner,
    PairSelection,
    RandomHardMiner,
    SemiHardMiner,
)
from ddtas_lightning.miners.selection import enumerate_triplets
from tests.references import all_triplets_from_masks, angle_embeddings, random_batch, ref_triplet_loss

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes", [(8, 2), (16, 4), (10, 10), (9, 1)])
@pytest.mark.parametrize("distance,squared", [("euclidean", False), ("cosine", False), ("euclidean", True)])
def test_matches_per_triplet_reference(dtype, batch, classes, distance, squared):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch + classes, clustered=0.7)
    sim.requires_grad_(True)
    loss_fn = TripletMarginLoss(threshold=0.3, distance=distance, squared=squared)
    gen = torch.Generator().manual_seed(0)
    for miner in [
        AllPairsMiner(),
        MultiSimilarityMiner(),
        BatchHardMiner(),
        SemiHardMiner(),
        RandomHardMiner(),
    ]:
        sel = miner(sim, labels, generator=gen)
        triplets = (
            list(zip(*(t.tolist() for t in sel.triplets)))
            if sel.triplets is not None
            else all_triplets_from_masks(sel.pos_mask, sel.neg_mask)
        )
        loss = loss_fn(sim, sel)
        ref = ref_triplet_loss(sim, triplets, 0.3, distance, squared)
        torch.testing.assert_close(loss, ref, **TOL[dtype])
        (g,) = torch.autograd.grad(loss, sim)
        (g_ref,) = torch.autograd.grad(ref, sim)
        torch.testing.assert_close(g, g_ref, **TOL[dtype])


def test_enumerate_triplets_is_the_lexicographic_list():
    for batch, classes, seed in [(12, 3, 0), (7, 7, 1), (10, 1, 2), (30, 4, 3)]:
        _, labels, sim = random_batch(batch, classes, seed=seed)
        sel = MultiSimilarityMiner(0.05)(sim, labels)
        got = list(zip(*(t.tolist() for t in enumerate_triplets(sel.pos_mask, sel.neg_mask))))
        assert got == all_triplets_from_masks(sel.pos_mask, sel.neg_mask)


def test_weights_and_pair_threshold():
    _, labels, sim = random_batch(16, 4, dtype=torch.float64, seed=3, clustered=0.5)
    sel = SemiHardMiner(margin=0.5)(sim, labels)
    t_count = sel.triplets[0].numel()
    assert t_count > 5
    w = torch.rand(t_count, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    triplets = list(zip(*(t.tolist() for t in sel.triplets)))
    loss_fn = TripletMarginLoss(threshold=0.5)
    torch.testing.assert_close(loss_fn(sim, sel, weights=w), ref_triplet_loss(sim, triplets, 0.5, weights=w))
    t2 = torch.tensor([0.2, 0.3], dtype=torch.float64)  # margin = 0.2 + 0.3
    torch.testing.assert_close(loss_fn(sim, sel, threshold=t2), loss_fn(sim, sel))
    with pytest.raises(ValueError):
        loss_fn(sim, sel, weights=torch.ones_like(sim))


def test_hand_made_angles():
    """Anchor at 0 deg, positive at 60 deg, negatives at 45 deg and 120 deg, cosine distance, margin
    0.1: d_ap = 0.5, d_an = 1 - cos 45 = 0.2929 (violates: 0.3071) and 1.5 (does not)."""
    import math

    emb = angle_embeddings([0, 60, 45, 120])
    sim = emb @ emb.T
    triplets = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3]))
    sel = PairSelection.from_indices_tuple(triplets, 4)
    loss = TripletMarginLoss(threshold=0.1, distance="cosine")(sim, sel)
    expected = 0.5 - (1 - math.cos(math.radians(45))) + 0.1  # the one non-zero triplet, AvgNonZero
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_nothing_selected_and_duplicates():
    _, labels, sim = random_batch(8, 2, seed=1)
    empty = PairSelection(torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool))
    s = sim.clone().requires_grad_(True)
    loss = TripletMarginLoss()(s, empty)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    # no triplet violates a negative margin -> exactly 0, with a graph
    loss = TripletMarginLoss(threshold=-10.0)(s, AllPairsMiner()(s, labels))
    assert loss.item() == 0.0 and loss.requires_grad
    # duplicated embeddings: euclidean distance 0 for the positive pair, finite gradient (no sqrt(0) NaN)
    emb, labels, _ = random_batch(6, 3, seed=2)
    emb = torch.cat([emb, emb]).requires_grad_(True)
    labels = torch.cat([labels, labels])
    loss = TripletMarginLoss(threshold=1.0).from_embeddings(emb, labels)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("type_of_triplets", ["all", "semihard", "hard"])
def test_pml_parity(dtype, distance, type_of_triplets):
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(24, 8, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 5, (24,), generator=g)
    pml_dist = pml_distances.LpDistance() if distance == "euclidean" else pml_distances.CosineSimilarity()
    it = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=type_of_triplets, distance=pml_dist)(
        emb, labels
    )
    assert len(it[0]) > 0
    theirs = pml_losses.TripletMarginLoss(margin=0.2, distance=pml_dist)(emb, labels, it)
    ours = TripletMarginLoss(threshold=0.2, distance=distance).from_embeddings(emb, labels, it)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours, theirs, **tol)
    (g1,) = torch.autograd.grad(ours, emb)
    (g2,) = torch.autograd.grad(theirs, emb)
    torch.testing.assert_close(g1, g2, **tol)
