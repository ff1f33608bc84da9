"""Per-pair weights with every loss of the library: where they enter, their shape and order, and a
finite real update (pair losses: (B, M); the triplet loss: (T,), one per triplet)."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.losses import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    SoftContrastiveLoss,
    TripletMarginLoss,
)
from ddtas_lightning.miners.batch_hard import BatchHardMiner
from ddtas_lightning.miners.ms import MultiSimilarityMiner
from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.miners.selection import enumerate_triplets
from ddtas_lightning.policies import MetaPairWeights
from tests.policies.problems import make_batch, make_model

PAIR_LOSSES = {
    "ms": lambda: MultiSimilarityLoss(scale_neg=10.0),
    "soft_contrastive": lambda: SoftContrastiveLoss(scale_neg=10.0, threshold=0.5),
    "binomial": lambda: BinomialDevianceLoss(scale_neg=10.0),
    "contrastive": lambda: ContrastiveLoss(threshold=0.0),
}
FORMS = ["official", "per_sign", "loss_terms"]


@pytest.mark.parametrize("mode", ["exact", "jvp"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("loss_name", sorted(PAIR_LOSSES))
def test_pair_losses_take_weights_on_the_mined_pairs(loss_name, form, mode):
    loss_fn = PAIR_LOSSES[loss_name]()
    model, batch = make_model(20), make_batch(20)
    miner = MultiSimilarityMiner(epsilon=0.5)
    weighed = MetaPairWeights(mode=mode, inner_lr=1e-3, normalization=form).weigh(model, loss_fn, miner, batch)
    sel, w = weighed.selection, weighed.weights
    assert w.shape == sel.pos_mask.shape and w.max() == 1
    assert (w[~(sel.pos_mask | sel.neg_mask)] == 0).all()  # only mined pairs carry weight
    loss = weighed.head(weighed.sim, w)
    # where the weights enter, written out
    expected = loss_fn(weighed.sim, sel, weights=w) if form == "loss_terms" else loss_fn(w * weighed.sim, sel)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    if form != "loss_terms" and loss_name == "contrastive":
        # the hinge relu(w s - lambda) is inactive at w = 0: negatives get no weight (hence loss_terms)
        assert (w[sel.neg_mask] == 0).all()
    elif form == "per_sign" or form == "loss_terms":
        assert w[sel.pos_mask].max() == 1 and w[sel.neg_mask].max() == 1


@pytest.mark.parametrize("miner_name", ["all_pairs", "batch_hard"])
@pytest.mark.parametrize("form", FORMS)
def test_triplet_loss_takes_one_weight_per_triplet_in_the_selection_order(form, miner_name):
    loss_fn = TripletMarginLoss(threshold=0.5)
    model, batch = make_model(21), make_batch(21)
    miner = AllPairsMiner() if miner_name == "all_pairs" else BatchHardMiner()
    weighed = MetaPairWeights(mode="jvp", inner_lr=1e-3, normalization=form).weigh(model, loss_fn, miner, batch)
    sel = weighed.selection
    triplets = sel.triplets if sel.triplets is not None else enumerate_triplets(sel.pos_mask, sel.neg_mask)
    w = weighed.weights
    assert w.shape == (triplets[0].numel(),) and w.max() == 1
    # weight k belongs to triplet k: a one-hot weight gives exactly that triplet's hinge (over the
    # number of active triplets)
    s = weighed.sim.detach()
    a, p, n = triplets
    d = loss_fn.pair_distance
    hinge = torch.relu(d(s[a, p]) - d(s[a, n]) + 0.5)
    active = (hinge > 0).sum()
    for k in torch.nonzero(w > 0).flatten()[:5].tolist():
        one_hot = torch.zeros_like(w)
        one_hot[k] = 1.0
        torch.testing.assert_close(weighed.head(s, one_hot), hinge[k] / active, rtol=1e-14, atol=0)
    loss = weighed.head(weighed.sim, w)
    torch.testing.assert_close(loss, loss_fn(weighed.sim, sel, weights=w), rtol=0, atol=0)
    loss.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters())
    assert weighed.logs["meta/weighted_triplets"] == (w > 0).sum()
