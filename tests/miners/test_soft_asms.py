"""The sigmoid relaxation of ASMS against the hard rule as the temperature goes to 0, and its margin
derivative against finite differences."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.miners.asms import asms_masks
from ddtas_lightning.miners.selection import label_masks
from ddtas_lightning.miners.soft_asms import soft_asms_weights


def _problem(seed, n=12, classes=4):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(classes, (n,), generator=g)
    return emb @ emb.T, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("margin", [0.05, 0.1, 0.3])
def test_soft_weights_tend_to_the_hard_masks(seed, margin):
    sim, labels = _problem(seed)
    pos, neg = label_masks(labels)
    hard_pos, hard_neg = asms_masks(sim, pos, neg, margin, margin / 10)
    for temperature, tol in ((1e-2, 0.5), (1e-9, 1e-6)):
        w_pos, w_neg = soft_asms_weights(sim, pos, neg, margin, temperature)
        assert (w_pos[~pos] == 0).all() and (w_neg[~neg] == 0).all()
        if temperature < 1e-6:  # no tie within 1e-6 on these random problems: exactly the hard rule
            assert torch.equal(w_pos > 0.5, hard_pos) and torch.equal(w_neg > 0.5, hard_neg)
            assert ((w_pos - hard_pos.double()).abs() < tol).all() and ((w_neg - hard_neg.double()).abs() < tol).all()


def test_margin_derivative_and_edge_cases():
    sim, labels = _problem(7)
    pos, neg = label_masks(labels)
    m = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    w_pos, w_neg = soft_asms_weights(sim, pos, neg, m, 0.05)
    (grad,) = torch.autograd.grad((w_pos * sim).sum() + (w_neg * sim).sum(), m)
    h = 1e-6
    f = lambda mm: sum((w * sim).sum() for w in soft_asms_weights(sim, pos, neg, mm, 0.05))  # noqa: E731
    assert float(grad) == pytest.approx(float((f(0.1 + h) - f(0.1 - h)) / (2 * h)), rel=1e-6)
    assert float(grad) != 0
    # an anchor without negatives keeps no positive (and vice versa), as the hard rule
    lone = torch.zeros(3, dtype=torch.long)
    p, n = label_masks(lone)
    w_pos, w_neg = soft_asms_weights(torch.eye(3, dtype=torch.float64), p, n, 0.1, 0.1)
    assert (w_pos == 0).all() and (w_neg == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        soft_asms_weights(sim, pos, neg, 0.1, 0.0)
