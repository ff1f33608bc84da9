"""SoftContrastive, BinomialDeviance and Contrastive losses against per-anchor references."""

from functools import partial

import pytest
import torch

from ddtas_lightning.losses import BinomialDevianceLoss, ContrastiveLoss, SoftContrastiveLoss
from ddtas_lightning.miners import (
    ASMS,
    AdaptiveToleranceASMS,
    AllPairsMiner,
    MultiSimilarityMiner,
    PairSelection,
)
from tests.references import (
    angle_embeddings,
    per_anchor_at_asms_soft_contrastive_step,
    random_batch,
    ref_binomial_loss,
    ref_contrastive_loss,
    ref_ddtas_ms_py_loss,
    ref_soft_contrastive_loss,
)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
CASES = [(8, 2), (32, 8), (20, 20), (12, 1), (45, 6)]
MINERS = [AllPairsMiner(), MultiSimilarityMiner(0.1), ASMS(0.1), AdaptiveToleranceASMS(0.1)]

LOSSES = [
    (SoftContrastiveLoss(), partial(ref_soft_contrastive_loss, scale_pos=2.0, scale_neg=40.0, threshold=0.7)),
    (
        SoftContrastiveLoss(scale_pos=3.0, scale_neg=20.0, threshold=0.4),
        partial(ref_soft_contrastive_loss, scale_pos=3.0, scale_neg=20.0, threshold=0.4),
    ),
    (BinomialDevianceLoss(), partial(ref_binomial_loss, scale_pos=2.0, scale_neg=40.0, threshold=0.5)),
    (ContrastiveLoss(), partial(ref_contrastive_loss, pos_margin=1.0, threshold=0.5)),
    (
        ContrastiveLoss(pos_margin=0.8, threshold=0.2),
        partial(ref_contrastive_loss, pos_margin=0.8, threshold=0.2),
    ),
]
IDS = ["softcon", "softcon-params", "binomial", "contrastive", "contrastive-params"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes", CASES)
@pytest.mark.parametrize("loss_fn,ref_fn", LOSSES, ids=IDS)
def test_matches_per_anchor_reference(dtype, batch, classes, loss_fn, ref_fn):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch + 3 * classes, clustered=1.5)
    sim.requires_grad_(True)
    for miner in MINERS:
        sel = miner(sim, labels)
        loss = loss_fn(sim, sel)
        ref = ref_fn(sim, sel.pos_mask, sel.neg_mask)
        torch.testing.assert_close(loss, ref, **TOL[dtype])
        (g,) = torch.autograd.grad(loss, sim)
        (g_ref,) = torch.autograd.grad(ref, sim)
        torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("loss_fn,ref_fn", LOSSES, ids=IDS)
def test_weights_pair_thresholds_and_memory(loss_fn, ref_fn):
    emb, labels, _ = random_batch(12, 3, dtype=torch.float64, seed=21, clustered=1.0)
    mem, mem_labels, _ = random_batch(30, 5, dtype=torch.float64, seed=22, clustered=1.0)
    sim = emb @ mem.T
    w = torch.rand(sim.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.6, 0.3], dtype=torch.float64)
    for miner in MINERS:
        sel = miner(sim, labels, mem_labels)
        loss = loss_fn(sim, sel, threshold=t, weights=w)
        torch.testing.assert_close(loss, ref_fn(sim, sel.pos_mask, sel.neg_mask, weights=w, threshold=t))
        torch.testing.assert_close(loss_fn(sim, sel, weights=torch.ones_like(sim)), loss_fn(sim, sel))


def test_hand_made_angles_soft_contrastive():
    """Anchors at 0 and 30 deg (class 0), 90 and 100 deg (class 1): every anchor has one positive and
    two negatives; the loss written out by hand with cosines of the angle differences."""
    import math

    emb = angle_embeddings([0, 30, 90, 100])
    labels = torch.tensor([0, 0, 1, 1])
    sim = emb @ emb.T
    lam, beta, alpha = 0.7, 2.0, 40.0

    def sp(x):
        return math.log1p(math.exp(x))

    c = [math.cos(math.radians(d)) for d in (30, 90, 100, 60, 70, 10)]
    s01, s02, s03, s12, s13, s23 = c
    rows = [(s01, [s02, s03]), (s01, [s12, s13]), (s23, [s02, s12]), (s23, [s03, s13])]
    expected = (
        sum(
            2 / beta * sp(-beta * (p - lam)) + 2 / alpha * sum(sp(alpha * (n - lam)) for n in negs) / 2
            for p, negs in rows
        )
        / 4
    )
    loss = SoftContrastiveLoss()(sim, PairSelection.all_pairs(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "loss_fn", [SoftContrastiveLoss(), BinomialDevianceLoss()], ids=["softcon", "binomial"]
)
def test_anchors_missing_one_side_are_skipped_but_counted(loss_fn):
    _, _, sim = random_batch(6, 2, dtype=torch.float64, seed=2)
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6)):  # one class / all distinct
        s = sim.clone().requires_grad_(True)
        loss = loss_fn(s, AllPairsMiner()(s, labels))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
    # one anchor row emptied: the loss is the other rows' sum divided by the full B
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    sel = AllPairsMiner()(sim, labels)
    full = loss_fn(sim, sel)
    sel.pos_mask[0] = False
    ref = ref_binomial_loss if isinstance(loss_fn, BinomialDevianceLoss) else ref_soft_contrastive_loss
    kw = {"threshold": loss_fn.threshold}
    torch.testing.assert_close(loss_fn(sim, sel), ref(sim, sel.pos_mask, sel.neg_mask, **kw))
    assert loss_fn(sim, sel) < full


def test_contrastive_counts_every_pair_and_has_a_threshold_gradient():
    _, labels, sim = random_batch(16, 4, dtype=torch.float64, seed=8, clustered=1.0)
    sel = AllPairsMiner()(sim, labels)
    lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = ContrastiveLoss()(sim, sel, threshold=lam)
    (g,) = torch.autograd.grad(loss, lam)
    active = (sel.neg_mask & (sim > 0.1)).sum()
    assert active > 0
    assert g.item() == pytest.approx(-active.item() / 16)
    # a (2,) threshold replaces pos_margin as well
    t2 = torch.tensor([0.9, 0.1], dtype=torch.float64)
    torch.testing.assert_close(
        ContrastiveLoss()(sim, sel, threshold=t2), ContrastiveLoss(pos_margin=0.9, threshold=0.1)(sim, sel)
    )


def test_binomial_normalize_scales_is_soft_contrastive():
    _, labels, sim = random_batch(24, 6, dtype=torch.float64, seed=4, clustered=1.0)
    sel = MultiSimilarityMiner()(sim, labels)
    a = BinomialDevianceLoss(threshold=0.5, normalize_scales=True)(sim, sel)
    b = SoftContrastiveLoss(threshold=0.5)(sim, sel)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(BinomialDevianceLoss(threshold=0.5)(sim, sel), b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compat_floor_div_bug_reproduces_ddtas_ms_py(seed):
    """SoftContrastive(compat_floor_div_bug=True) + ASMS(exclude_self_by_value=True) is DDTAS MS.py."""
    _, labels, sim = random_batch(40, 8, dtype=torch.float64, seed=seed, clustered=1.0)
    official = ref_ddtas_ms_py_loss(sim, labels, margin=0.1)
    sel = ASMS(0.1, exclude_self_by_value=True)(sim, labels)
    ours = SoftContrastiveLoss(compat_floor_div_bug=True)(sim, sel)
    torch.testing.assert_close(ours, official, rtol=1e-10, atol=1e-12)
    fixed = SoftContrastiveLoss()(sim, sel)
    assert not torch.allclose(fixed, official)


@pytest.mark.parametrize("batch,classes", [(16, 4), (40, 8), (30, 15)])
def test_at_asms_soft_contrastive_end_to_end_matches_the_per_anchor_step(batch, classes):
    emb, labels, _ = random_batch(batch, classes, dim=8, dtype=torch.float64, seed=batch, clustered=1.0)
    emb = emb.clone().requires_grad_(True)
    ref = per_anchor_at_asms_soft_contrastive_step(emb, labels)
    (g_ref,) = torch.autograd.grad(ref, emb)
    sel = AdaptiveToleranceASMS(0.1).mine_embeddings(emb, labels)
    ours = SoftContrastiveLoss().from_embeddings(emb, labels, sel.to_indices_tuple())
    (g,) = torch.autograd.grad(ours, emb)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_hand_made_angles_binomial_and_contrastive():
    """Three points: a (0 deg) and p (60 deg) of class 0, n (80 deg) of class 1."""
    import math

    emb = angle_embeddings([0, 60, 80])
    labels = torch.tensor([0, 0, 1])
    sim = emb @ emb.T
    sel = PairSelection.all_pairs(labels)
    s_ap, s_an, s_pn = (math.cos(math.radians(d)) for d in (60, 80, 20))

    def sp(x):
        return math.log1p(math.exp(x))

    # binomial: rows a and p have one positive and one negative, row n has no positive (skipped)
    expected = (
        sp(-2 * (s_ap - 0.5)) + sp(40 * (s_an - 0.5)) + sp(-2 * (s_ap - 0.5)) + sp(40 * (s_pn - 0.5))
    ) / 3
    assert BinomialDevianceLoss()(sim, sel).item() == pytest.approx(expected, rel=1e-12)
    # contrastive, pos_margin 1, lambda 0.5: positives a-p twice (1 - .5 each); negatives above 0.5:
    # only p-n (cos 20 = .940) in both directions
    expected = (2 * (1 - s_ap) + 2 * (s_pn - 0.5)) / 3
    assert ContrastiveLoss()(sim, sel).item() == pytest.approx(expected, rel=1e-12)
