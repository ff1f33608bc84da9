"""The shared virtual-step machinery, against plain references (model copies, finite differences)."""

from __future__ import annotations

import copy

import pytest
import torch

from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.policies.virtual_step import (
    FunctionalModel,
    cotangent_meta_gradient,
    exact_meta_gradient,
    gradient,
    tangent_meta_gradient,
    virtual_sgd_step,
)
from tests.policies.problems import LOSSES, make_batch, make_model


def _setup(bn=None, seed=0):
    model, batch = make_model(seed, bn=bn), make_batch(seed)
    return model, batch, FunctionalModel(model)


@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_functional_call_matches_the_module_and_only_the_real_pass_updates_buffers(bn):
    model, batch, fm = _setup(bn)
    ref = copy.deepcopy(model)
    expected = ref(batch.images)  # one plain forward: updates the copy's running stats (train-mode BN)
    before = {k: b.clone() for k, b in model.named_buffers()}
    out = fm(batch.meta_images, update_buffers=False)
    torch.testing.assert_close(out, copy.deepcopy(model)(batch.meta_images), rtol=0, atol=1e-15)
    for k, b in model.named_buffers():  # the throw-away pass wrote nothing back
        assert torch.equal(b, before[k]), k
    out = fm(batch.images)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    for (k, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), k  # the real pass updated them exactly as a plain forward
    if bn == "train":
        assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])


def test_virtual_step_does_not_touch_the_real_parameters():
    model, batch, fm = _setup()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    emb = fm(batch.images)
    sel = PairSelection.all_pairs(batch.labels)
    loss_fn = LOSSES["ms"]()
    train_loss = loss_fn(emb @ emb.T, sel)
    virtual = virtual_sgd_step(train_loss, fm.params, 0.5)
    g = gradient(train_loss, fm.params)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k])
        assert p.grad is None
        torch.testing.assert_close(virtual[k], before[k] - 0.5 * g[k])
        assert virtual[k].requires_grad


@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_forward_tangent_matches_finite_differences(bn):
    model, batch, fm = _setup(bn)
    g = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in fm.params.items()}

    def sim_at(t):
        params = {k: p.detach() + t * v[k] for k, p in fm.params.items()}
        e = fm(batch.images, params, update_buffers=False)
        return e @ e.T

    h = 1e-6
    fd = (sim_at(h) - sim_at(-h)) / (2 * h)
    for keep_graph in (False, True):
        s, s_dot = fm.forward_with_tangent(
            batch.images, v, fn=lambda e: e @ e.T, update_buffers=False, keep_graph=keep_graph
        )
        torch.testing.assert_close(s_dot, fd, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(s, sim_at(0.0), rtol=0, atol=1e-14)
        assert s.requires_grad == keep_graph
        assert not s_dot.requires_grad
    # the kept graph is the real one: back-propagating it gives the parameters' gradient
    grads = gradient(s.sum(), fm.params)
    twin = copy.deepcopy(model)
    e = twin(batch.images)
    ref = torch.autograd.grad((e @ e.T).sum(), list(twin.parameters()))
    for got, want in zip(grads.values(), ref):
        torch.testing.assert_close(got, want)


def test_tangent_formula_is_exact_with_the_meta_gradient_at_the_virtual_parameters(loss_fn):
    """dL_m/dc = -eta (d/dc dhead/dS)^T J_S v' with v' = grad L_m(theta'): an identity, not an
    approximation (ddtas.md §2.3), here with *per-pair weights* as the control (MMSI's use)."""
    model, batch, fm = _setup()
    eta = 0.3
    emb = fm(batch.images)
    sim = emb @ emb.T
    sel = PairSelection.all_pairs(batch.labels)
    meta_sel = PairSelection.all_pairs(batch.meta_labels)
    w = torch.rand(sim.shape, generator=torch.Generator().manual_seed(5), dtype=sim.dtype).requires_grad_(True)

    def meta_loss_fn(params):
        e = fm(batch.meta_images, params, update_buffers=False)
        return loss_fn(e @ e.T, meta_sel)

    exact = exact_meta_gradient(loss_fn(sim, sel, weights=w), w, meta_loss_fn, fm.params, eta)
    virtual = {k: p.detach() for k, p in virtual_sgd_step(loss_fn(sim, sel, weights=w), fm.params, eta,
                                                           create_graph=False).items()}
    v_prime = gradient(meta_loss_fn({k: p.requires_grad_(True) for k, p in virtual.items()}), virtual)
    _, s_dot = fm.forward_with_tangent(batch.images, v_prime, fn=lambda e: e @ e.T, keep_graph=False,
                                       update_buffers=False)
    first = tangent_meta_gradient(lambda s, c: loss_fn(s, sel, weights=c), sim, s_dot, w, eta)
    assert exact.grad.abs().max() > 1e-4
    torch.testing.assert_close(first, exact.grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("bn", [None, "train"])
@pytest.mark.parametrize("threshold", [0.5, (0.55, 0.45)], ids=["scalar", "pos_neg"])
def test_reverse_and_forward_mode_give_the_same_meta_gradient(loss_fn, threshold, bn):
    model, batch, fm = _setup(bn, seed=4)
    emb = fm(batch.images)
    sim = emb @ emb.T
    sel = PairSelection.all_pairs(batch.labels)
    lam = torch.tensor(threshold, dtype=sim.dtype, requires_grad=True)
    g = torch.Generator().manual_seed(6)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in fm.params.items()}

    def head(s, c):
        return loss_fn(s, sel, threshold=c)

    _, s_dot = fm.forward_with_tangent(batch.images, v, fn=lambda e: e @ e.T, keep_graph=False,
                                       update_buffers=False)
    forward = tangent_meta_gradient(head, sim, s_dot, lam, 0.1)
    reverse = cotangent_meta_gradient(head, sim, lam, v, fm.params, 0.1)
    assert forward.abs().min() > 1e-6
    torch.testing.assert_close(reverse, forward, rtol=1e-9, atol=0)
    sim.sum().backward()  # the train graph is still alive for the real update
