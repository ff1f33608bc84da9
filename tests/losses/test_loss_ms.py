"""MultiSimilarityLoss: per-anchor reference, hand-made angles, edge cases, PML parity."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from ddtas_lightning.losses import MultiSimilarityLoss
from ddtas_lightning.miners import AllPairsMiner, MultiSimilarityMiner, PairSelection
from tests.references import angle_embeddings, random_batch, ref_ms_loss

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
CASES = [(8, 2), (32, 8), (20, 20), (12, 1), (45, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes", CASES)
@pytest.mark.parametrize("miner", [AllPairsMiner(), MultiSimilarityMiner(0.1)])
def test_matches_per_anchor_reference(dtype, batch, classes, miner):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch * 7 + classes, clustered=1.0)
    sim.requires_grad_(True)
    sel = miner(sim, labels)
    loss = MultiSimilarityLoss()(sim, sel)
    (g,) = torch.autograd.grad(loss, sim)
    ref = ref_ms_loss(sim, sel.pos_mask, sel.neg_mask, 2.0, 40.0, 0.5)
    (g_ref,) = torch.autograd.grad(ref, sim)
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("threshold", [0.3, (0.6, 0.2)])
def test_reference_with_weights_threshold_pair_and_other_scales(threshold):
    _, labels, sim = random_batch(24, 6, dtype=torch.float64, seed=3, clustered=1.0)
    w = torch.rand(sim.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sel = MultiSimilarityMiner(0.3)(sim, labels)
    loss_fn = MultiSimilarityLoss(scale_pos=3.0, scale_neg=25.0, threshold=0.1)
    t = torch.tensor(threshold, dtype=torch.float64)
    loss = loss_fn(sim, sel, threshold=t, weights=w)
    ref = ref_ms_loss(sim, sel.pos_mask, sel.neg_mask, 3.0, 25.0, t, weights=w)
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])
    # weights == 1 is the unweighted loss; weights == 0 removes the pairs from the value but keeps a
    # finite gradient w.r.t. the weights (d/dw_k log(1 + sum w e^x) = e^{x_k} at w = 0; MMSI-style policies)
    torch.testing.assert_close(loss_fn(sim, sel, t, torch.ones_like(sim)), loss_fn(sim, sel, t))
    w0 = torch.zeros_like(sim, requires_grad=True)
    loss0 = loss_fn(sim, sel, t, w0)
    assert abs(loss0.item()) < 1e-12
    (gw,) = torch.autograd.grad(loss0, w0)
    lp, ln = (t, t) if t.ndim == 0 else (t[0], t[1])
    expected = torch.where(sel.pos_mask, torch.exp(-3.0 * (sim - lp)) / 3.0, 0.0)
    expected = expected + torch.where(sel.neg_mask, torch.exp(25.0 * (sim - ln)) / 25.0, 0.0)
    torch.testing.assert_close(gw, expected / sim.shape[0])


def test_reference_against_a_memory_bank():
    _, labels, _ = random_batch(16, 4, seed=1)
    emb, _, _ = random_batch(16, 4, dtype=torch.float64, seed=1)
    mem, mem_labels, _ = random_batch(40, 6, dtype=torch.float64, seed=2)
    sim = emb @ mem.T
    sel = MultiSimilarityMiner(0.1)(sim, labels, mem_labels)
    assert sel.pos_mask.shape == (16, 40)
    loss = MultiSimilarityLoss()(sim, sel)
    torch.testing.assert_close(loss, ref_ms_loss(sim, sel.pos_mask, sel.neg_mask), **TOL[torch.float64])


def test_hand_made_angles():
    """5 embeddings at 0, 20, 40, 60, 80 degrees, labels [0, 0, 1, 1, 2], all pairs: the loss written
    out with math.cos on the angle differences."""
    angles = [0, 20, 40, 60, 80]
    labels = [0, 0, 1, 1, 2]
    emb = angle_embeddings(angles)
    sim = emb @ emb.T
    a, b, lam = 2.0, 40.0, 0.5
    expected = 0.0
    for i in range(5):
        s = [math.cos(math.radians(angles[i] - angles[j])) for j in range(5)]
        pos = [s[j] for j in range(5) if j != i and labels[j] == labels[i]]
        neg = [s[j] for j in range(5) if labels[j] != labels[i]]
        if pos:
            expected += math.log(1 + sum(math.exp(-a * (x - lam)) for x in pos)) / a
        expected += math.log(1 + sum(math.exp(b * (x - lam)) for x in neg)) / b
    expected /= 5
    loss = MultiSimilarityLoss(a, b, lam)(sim, PairSelection.all_pairs(torch.tensor(labels)))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_edge_cases():
    one_class = torch.zeros(6, dtype=torch.long)
    distinct = torch.arange(6)
    emb, _, sim = random_batch(6, 2, dtype=torch.float64, seed=5)
    loss_fn = MultiSimilarityLoss()
    for labels in (one_class, distinct):
        sel = AllPairsMiner()(sim, labels)
        ref = ref_ms_loss(sim, sel.pos_mask, sel.neg_mask)
        assert ref.item() > 0
        torch.testing.assert_close(loss_fn(sim, sel), ref)
        # the MS miner needs both kinds: nothing mined -> exactly zero, with a graph
        s = sim.clone().requires_grad_(True)
        mined = MultiSimilarityMiner()(s, labels)
        assert not mined.pos_mask.any() and not mined.neg_mask.any()
        loss = loss_fn(s, mined)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


def test_duplicate_embeddings_are_positives_and_large_scales_do_not_overflow():
    emb, labels, _ = random_batch(8, 2, dtype=torch.float32, seed=9)
    emb = torch.cat([emb, emb])  # every embedding twice, same label
    labels = torch.cat([labels, labels])
    sim = (emb @ emb.T).requires_grad_(True)
    sel = AllPairsMiner()(sim, labels)
    assert sel.pos_mask[0, 8]  # the duplicate is a positive (self excluded by index only)
    loss = MultiSimilarityLoss(scale_pos=2.0, scale_neg=200.0, threshold=-0.5)(sim, sel)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()
    ref = ref_ms_loss(sim.double(), sel.pos_mask, sel.neg_mask, 2.0, 200.0, -0.5)
    assert torch.isfinite(ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


# ---- PML parity -----------------------------------------------------------------------------------
def _pml_ms_loss(scale_pos=2.0, scale_neg=40.0, threshold=0.5):
    return pml_losses.MultiSimilarityLoss(alpha=scale_pos, beta=scale_neg, base=threshold)


def _guard_triggers(indices_tuple):
    return all(len(x) <= 1 for x in indices_tuple)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes", [(32, 8), (40, 10), (16, 16), (10, 1), (80, 16)])
def test_pml_parity_all_pairs_and_pml_miner(dtype, batch, classes):
    g = torch.Generator().manual_seed(batch + classes)
    emb = torch.randn(batch, 32, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), generator=g)
    ours_fn, pml_fn = MultiSimilarityLoss(2.0, 40.0, 0.5), _pml_ms_loss()
    tuples = [None, pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)]
    for it in tuples:
        if it is not None and _guard_triggers(it):
            continue
        ours = ours_fn.from_embeddings(emb, labels, it)
        theirs = pml_fn(emb, labels, it)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
        (g1,) = torch.autograd.grad(ours, emb)
        (g2,) = torch.autograd.grad(theirs, emb)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", [(2.0, 50.0, 0.5), (1.0, 10.0, 0.2), (4.0, 40.0, 0.7)])
def test_pml_parity_our_miner_end_to_end_with_memory(params):
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(24, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (24,), generator=g)
    mem = torch.randn(50, 16, generator=g, dtype=torch.float64)
    mem_labels = torch.randint(0, 6, (50,), generator=g)
    pml_it = pml_miners.MultiSimilarityMiner(0.2)(emb, labels, mem, mem_labels)
    theirs = _pml_ms_loss(*params)(emb, labels, pml_it, mem, mem_labels)
    sel = MultiSimilarityMiner(0.2).mine_embeddings(emb, labels, mem, mem_labels)
    sim = F.normalize(emb, dim=1) @ F.normalize(mem, dim=1).T
    ours = MultiSimilarityLoss(*params)(sim, sel)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_pml_guard_quirk_one_pair_of_each_kind():
    """PML's GenericPairLoss returns 0 when every index tensor has length <= 1; the formula does not."""
    emb, labels, sim = random_batch(8, 4, dtype=torch.float64, seed=4)
    a1, p = PairSelection.all_pairs(labels).pos_mask.nonzero(as_tuple=True)
    a2, n = PairSelection.all_pairs(labels).neg_mask.nonzero(as_tuple=True)
    it = (a1[:1], p[:1], a2[:1], n[:1])
    pml_value = _pml_ms_loss()(emb, labels, it)
    ours = MultiSimilarityLoss().from_embeddings(emb, labels, it)
    sel = PairSelection.from_indices_tuple(it, 8)
    assert pml_value.item() == 0.0  # PML's guard
    assert ours.item() > 0
    torch.testing.assert_close(ours, ref_ms_loss(sim, sel.pos_mask, sel.neg_mask))
    # with one more pair the guard no longer triggers and both agree again
    it2 = (a1[:2], p[:2], a2[:1], n[:1])
    torch.testing.assert_close(
        MultiSimilarityLoss().from_embeddings(emb, labels, it2), _pml_ms_loss()(emb, labels, it2)
    )
