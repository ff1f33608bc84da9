"""Properties every loss must have: threshold gradients (vs finite differences), exact zero with a
graph when nothing is selected, finite fp16/bf16 results."""

import pytest
import torch

from ddtas_lightning.losses import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    SoftContrastiveLoss,
    TripletMarginLoss,
)
from ddtas_lightning.miners import AdaptiveToleranceASMS, AllPairsMiner, MultiSimilarityMiner, PairSelection
from tests.references import random_batch

ALL_LOSSES = [
    MultiSimilarityLoss(),
    SoftContrastiveLoss(),
    BinomialDevianceLoss(),
    ContrastiveLoss(),
    TripletMarginLoss(),
    TripletMarginLoss(distance="cosine"),
]
IDS = ["ms", "soft_contrastive", "binomial", "contrastive", "triplet", "triplet-cosine"]


def _finite_difference(f, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(t)
    for k in range(t.numel()):
        e = torch.zeros_like(t).flatten()
        e[k] = h
        e = e.view_as(t)
        grad.view(-1)[k] = (f(t + e) - f(t - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=IDS)
@pytest.mark.parametrize("threshold", [[0.45], [0.55, 0.35]], ids=["scalar", "pos_neg"])
def test_threshold_gradient_matches_finite_differences(loss_fn, threshold):
    _, labels, sim = random_batch(24, 6, dtype=torch.float64, seed=13, clustered=1.0)
    sel = (
        AdaptiveToleranceASMS(0.3)(sim, labels)
        if not isinstance(loss_fn, TripletMarginLoss)
        else (AllPairsMiner()(sim, labels))
    )
    t = torch.tensor(threshold[0] if len(threshold) == 1 else threshold, dtype=torch.float64)
    t.requires_grad_(True)
    loss = loss_fn(sim, sel, threshold=t)
    (g,) = torch.autograd.grad(loss, t)
    fd = _finite_difference(lambda x: loss_fn(sim, sel, threshold=x).detach(), t.detach())
    assert g.abs().sum() > 0  # the threshold matters
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "loss_fn", [MultiSimilarityLoss(), SoftContrastiveLoss(), BinomialDevianceLoss()], ids=IDS[:3]
)
def test_gradcheck_wrt_sim_threshold_and_weights(loss_fn):
    _, labels, sim = random_batch(8, 3, dtype=torch.float64, seed=2, clustered=1.0)
    sel = MultiSimilarityMiner(0.3)(sim, labels)
    w = torch.rand(sim.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    t = torch.tensor([0.5, 0.4], dtype=torch.float64)
    inputs = (sim.clone().requires_grad_(True), t.requires_grad_(True), w.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda s, th, ww: loss_fn(s, sel, th, ww), inputs)


def test_a_float32_threshold_tensor_with_a_float64_loss_keeps_its_gradient():
    _, labels, sim = random_batch(16, 4, dtype=torch.float64, seed=1)
    t = torch.tensor(0.5, requires_grad=True)  # float32 leaf, as a policy buffer might be
    loss = MultiSimilarityLoss()(sim, AllPairsMiner()(sim, labels), threshold=t)
    loss.backward()
    assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad != 0


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nothing_selected_is_exactly_zero_with_a_graph(loss_fn, dtype):
    _, _, sim = random_batch(300, 3, dtype=torch.float32, seed=0)
    sim = torch.ones_like(sim).to(dtype).requires_grad_(True)  # collapsed: sum(sim) overflows fp16
    empty = PairSelection(torch.zeros(300, 300, dtype=torch.bool), torch.zeros(300, 300, dtype=torch.bool))
    t = torch.tensor([0.5, 0.4], requires_grad=True)
    loss = loss_fn(sim, empty, threshold=t)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(sim.grad, torch.zeros_like(sim))
    assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_computed_in_float32(loss_fn, dtype):
    emb, labels, _ = random_batch(64, 8, dtype=torch.float32, seed=4, clustered=1.0)
    emb = torch.cat([emb, emb[:4]])  # exact duplicates: S = 1, euclidean distance 0
    labels = torch.cat([labels, labels[:4]])
    sim = (emb.to(dtype) @ emb.to(dtype).T).requires_grad_(True)
    sel = MultiSimilarityMiner()(sim, labels)
    loss = loss_fn(sim, sel, threshold=torch.tensor(0.5, requires_grad=True))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert sim.grad.dtype == dtype and torch.isfinite(sim.grad).all()
    # the same as the float32 loss on the same (rounded) similarities
    torch.testing.assert_close(loss.detach(), loss_fn(sim.detach().float(), sel, threshold=0.5))


@pytest.mark.parametrize("loss_fn", ALL_LOSSES[:4], ids=IDS[:4])
def test_second_order_gradients_for_the_meta_policy(loss_fn):
    """The meta (OTG) policy differentiates d(loss)/d(params) again w.r.t. lambda (create_graph=True)."""
    _, labels, sim = random_batch(6, 2, dtype=torch.float64, seed=5, clustered=1.0)
    sel = AllPairsMiner()(sim, labels)
    t = torch.tensor([0.5, 0.3], dtype=torch.float64, requires_grad=True)
    s = sim.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x, th: loss_fn(x, sel, th), (s, t))
