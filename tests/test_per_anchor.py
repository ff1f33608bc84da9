"""Per-anchor loss thresholds: the losses with a (B,) / (B, 1) threshold against per-anchor loop
references, and ``threshold_policy.granularity=per_anchor`` of MetaThreshold (float64, tiny
problems: the meta gradient per anchor vs finite differences, its sum vs the scalar one)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.losses import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    SoftContrastiveLoss,
    TripletMarginLoss,
)
from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS
from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.policies import HypergradThreshold, MetaThreshold
from tests.policies.conftest import _one_thread  # noqa: F401 - autouse fixture: one intra-op thread
from tests.policies.problems import LOSSES, central_difference, make_batch, make_model
from tests.policies.test_meta_threshold import MODES, _objective, _selection
from tests.references import random_batch

CONF = Path(__file__).resolve().parents[1] / "conf" / "threshold_policy" / "meta.yaml"


# ---- per-anchor references: the formulas, one anchor row (and one pair) at a time ----------------
def ref_ms(sim, pos, neg, lam, a=2.0, b=40.0, weights=None):
    """(1/B) sum_i (1/a) log(1 + sum_P w e^{-a(S - l_i)}) + (1/b) log(1 + sum_N w e^{b(S - l_i)})."""
    total = (sim * 0).sum()
    for i in range(sim.shape[0]):
        sp = sn = sim[i, 0] * 0
        for j in range(sim.shape[1]):
            w = 1.0 if weights is None else weights[i, j]
            if pos[i, j]:
                sp = sp + w * torch.exp(-a * (sim[i, j] - lam[i]))
            if neg[i, j]:
                sn = sn + w * torch.exp(b * (sim[i, j] - lam[i]))
        total = total + torch.log(1 + sp) / a + torch.log(1 + sn) / b
    return total / sim.shape[0]


def ref_mean_softplus(sim, pos, neg, lam, sp, sn, cp, cn, weights=None):
    """(1/B) sum_{i valid} cp mean_P w log(1 + e^{-sp(S - l_i)}) + cn mean_N w log(1 + e^{sn(S - l_i)})."""
    total = (sim * 0).sum()
    for i in range(sim.shape[0]):
        P = [j for j in range(sim.shape[1]) if pos[i, j]]
        N = [j for j in range(sim.shape[1]) if neg[i, j]]
        if not P or not N:
            continue
        w = [1.0] * sim.shape[1] if weights is None else weights[i]
        total = total + cp * sum(w[j] * torch.log(1 + torch.exp(-sp * (sim[i, j] - lam[i]))) for j in P) / len(P)
        total = total + cn * sum(w[j] * torch.log(1 + torch.exp(sn * (sim[i, j] - lam[i]))) for j in N) / len(N)
    return total / sim.shape[0]


def ref_contrastive(sim, pos, neg, lam, pos_margin=1.0, weights=None):
    """(1/B) [sum_P w relu(m_pos - S) + sum_N w relu(S - l_i)]."""
    total = (sim * 0).sum()
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            w = 1.0 if weights is None else weights[i, j]
            if pos[i, j]:
                total = total + w * torch.clamp(pos_margin - sim[i, j], min=0)
            if neg[i, j]:
                total = total + w * torch.clamp(sim[i, j] - lam[i], min=0)
    return total / sim.shape[0]


def ref_triplet(sim, pos, neg, lam, weights=None):
    """sum_t relu(d(a,p) - d(a,n) + m_a) / #{t active}, d = sqrt(2 - 2S), m_a = the anchor's margin."""
    total, active = (sim * 0).sum(), 0
    for a in range(sim.shape[0]):
        for p in range(sim.shape[1]):
            for n in range(sim.shape[1]):
                if pos[a, p] and neg[a, n]:
                    hinge = torch.clamp(torch.sqrt(2 - 2 * sim[a, p]) - torch.sqrt(2 - 2 * sim[a, n]) + lam[a], min=0)
                    active += int(hinge > 0)
                    total = total + hinge
    return total / max(active, 1)


PAIR_LOSSES = {  # id -> (loss, per-anchor reference (sim, pos, neg, lam, weights))
    "ms": (MultiSimilarityLoss(2.0, 10.0), lambda s, p, n, lam, w: ref_ms(s, p, n, lam, 2.0, 10.0, w)),
    "soft_contrastive": (SoftContrastiveLoss(2.0, 10.0),
                         lambda s, p, n, lam, w: ref_mean_softplus(s, p, n, lam, 2.0, 10.0, 1.0, 0.2, w)),
    "binomial": (BinomialDevianceLoss(3.0, 10.0),
                 lambda s, p, n, lam, w: ref_mean_softplus(s, p, n, lam, 3.0, 10.0, 1.0, 1.0, w)),
    "contrastive": (ContrastiveLoss(pos_margin=0.9), lambda s, p, n, lam, w: ref_contrastive(s, p, n, lam, 0.9, w)),
}
ALL_LOSSES = {**PAIR_LOSSES, "triplet": (TripletMarginLoss(), lambda s, p, n, lam, w: ref_triplet(s, p, n, lam))}


def _hand_case():
    """3 anchors x 4 candidates (rectangular), hand-made similarities, masks and thresholds; anchor 2
    has no negative (skipped by the mean-softplus forms, its positive still counts elsewhere)."""
    sim = torch.tensor([[0.85, 0.6, 0.3, -0.2],
                        [0.2, 0.7, 0.95, 0.5],
                        [0.4, 0.8, 0.1, 0.65]], dtype=torch.float64)
    pos = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
    neg = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    return sim, PairSelection(pos, neg), torch.tensor([0.25, 0.55, 0.8], dtype=torch.float64)


def _random_case(seed: int, sparse: bool):
    """A batch against itself (all pairs, or a random subset of them: rows without pairs), random
    per-anchor thresholds."""
    _, labels, sim = random_batch(10, 3, dim=6, dtype=torch.float64, seed=seed, clustered=1.0)
    sel = PairSelection.all_pairs(labels)
    g = torch.Generator().manual_seed(seed)
    if sparse:
        keep = torch.rand(sim.shape, generator=g, dtype=torch.float64) < 0.5
        keep[0] = False  # an anchor without any pair
        sel = PairSelection(sel.pos_mask & keep, sel.neg_mask & keep)
    lam = 0.2 + 0.6 * torch.rand(10, generator=g, dtype=torch.float64)
    return sim, sel, lam


CASES = {"hand": _hand_case, "random": lambda: _random_case(1, False), "sparse": lambda: _random_case(2, True)}


# ---- losses ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name,weighted", [(n, False) for n in sorted(ALL_LOSSES)]
                         + [(n, True) for n in sorted(PAIR_LOSSES)])  # (triplet weights: per triplet)
def test_per_anchor_loss_matches_the_loop_reference(name, case, weighted):
    loss_fn, ref = ALL_LOSSES[name]
    sim, sel, lam = CASES[case]()
    sim = sim.clone().requires_grad_(True)
    w = None
    if weighted:
        w = 0.5 + torch.rand(sim.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = ref(sim, sel.pos_mask, sel.neg_mask, lam, w)
    assert expected.abs() > 1e-3  # the case exercises the loss
    for shape in [(sim.shape[0],), (sim.shape[0], 1)]:
        lam_v = lam.reshape(shape).clone().requires_grad_(True)
        out = loss_fn(sim, sel, threshold=lam_v, weights=w)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
        got = torch.autograd.grad(out, (sim, lam_v))
        want = torch.autograd.grad(ref(sim, sel.pos_mask, sel.neg_mask, lam_v.reshape(-1), w), (sim, lam_v))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_equal_per_anchor_thresholds_equal_the_scalar_exactly(name, case):
    loss_fn, _ = ALL_LOSSES[name]
    sim, sel, _ = CASES[case]()
    sim = sim.clone().requires_grad_(True)
    scalar = torch.tensor(0.45, dtype=torch.float64)
    expected = loss_fn(sim, sel, threshold=scalar)
    (g_expected,) = torch.autograd.grad(expected, sim)
    for shape in [(sim.shape[0],), (sim.shape[0], 1)]:
        out = loss_fn(sim, sel, threshold=scalar.expand(shape))
        assert torch.equal(out, expected)
        assert torch.equal(torch.autograd.grad(out, sim)[0], g_expected)
    # and a per-anchor threshold that differs in one row does change the loss (no silent broadcast)
    lam = scalar.repeat(sim.shape[0])
    lam[int(sel.valid_anchors.nonzero()[0])] = 0.0
    assert loss_fn(sim, sel, threshold=lam) != expected


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_per_anchor_threshold_gradient_equals_finite_differences(name):
    loss_fn, _ = ALL_LOSSES[name]
    sim, sel, lam = _random_case(3, False)
    lam_v = lam.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(sim, sel, threshold=lam_v), lam_v)
    expected = central_difference(lambda x: loss_fn(sim, sel, threshold=x), lam, h=1e-6)
    assert (expected != 0).sum() >= 3  # several anchors depend on their own threshold
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-10)


def test_two_rows_shapes_and_a_hand_value():
    """(2,) is always (pos, neg), also when B = 2; a per-anchor threshold of 2 rows is a (2, 1) column.
    Contrastive by hand: row 0 at lambda 0.5: relu(1 - 0.9) + relu(0.6 - 0.5) = 0.2; row 1 at 0.8:
    relu(1 - 0.95) = 0.05; loss = 0.25 / 2. As (pos_margin, lambda) = (0.5, 0.8) every term is 0."""
    sim = torch.tensor([[0.9, 0.6, 0.3], [0.2, 0.7, 0.95]], dtype=torch.float64)
    sel = PairSelection(torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool),
                        torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool))
    loss_fn = ContrastiveLoss()
    pair = torch.tensor([0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(loss_fn(sim, sel, threshold=pair[:, None]), torch.tensor(0.125, dtype=torch.float64))
    assert loss_fn(sim, sel, threshold=pair) == 0
    ms = MultiSimilarityLoss()
    lp, ln = ms.resolve_threshold(sim, pair)
    assert lp.ndim == 0 and ln.ndim == 0
    for bad in [torch.zeros(3), torch.zeros(2, 2), torch.zeros(1, 2)]:
        with pytest.raises(ValueError, match=r"one per anchor row .*B = 2.*got shape"):
            ms(sim, sel, threshold=bad)


def test_per_anchor_threshold_under_reduced_precision():
    """bf16 similarities are computed in float32; the per-anchor threshold follows."""
    sim, sel, lam = _random_case(4, False)
    low = sim.to(torch.bfloat16)
    for name, (loss_fn, _) in PAIR_LOSSES.items():
        out = loss_fn(low, sel, threshold=lam.float())
        assert out.dtype == torch.float32, name
        torch.testing.assert_close(out, loss_fn(low.float(), sel, threshold=lam.float()), rtol=0, atol=0)


# ---- MetaThreshold granularity=per_anchor -------------------------------------------------------------
def _policy(granularity="per_anchor", **kw) -> MetaThreshold:
    kw = {"init": 0.5, "min": 0.0, "max": 1.0, **kw}
    return MetaThreshold(granularity=granularity, **kw).double()


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_summed_per_anchor_meta_gradient_equals_the_scalar_one(mode, loss_name, bn):
    loss_fn, miner, batch = LOSSES[loss_name](), AdaptiveToleranceASMS(margin=0.3), make_batch(11)
    scalar = _policy("scalar", inner_lr=0.5, **MODES[mode])
    per_anchor = _policy(inner_lr=0.5, **MODES[mode])
    out_s = scalar.step(make_model(11, bn=bn), loss_fn, miner, batch)
    out_a = per_anchor.step(make_model(11, bn=bn), loss_fn, miner, batch)
    g = per_anchor.last_anchor_grad
    assert g.shape == (len(batch.labels),)
    assert g.std() > 1e-3 * g.abs().max() > 0  # the anchors' gradients differ: a real per-anchor signal
    torch.testing.assert_close(g.sum(), out_s.logs["meta/grad_lambda"], rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(out_a.logs["meta/grad_lambda"], g.sum(), rtol=0, atol=0)
    # the persistent lambda and the Adam state move exactly as the scalar granularity's
    for key in ("lam", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(getattr(per_anchor, key), getattr(scalar, key), rtol=1e-10, atol=0)
    assert torch.equal(per_anchor.step_count, scalar.step_count)
    torch.testing.assert_close(out_a.logs["meta/loss"], out_s.logs["meta/loss"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", ["identity", "double_backward"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_exact_per_anchor_meta_gradient_equals_finite_differences(impl, loss_name, bn):
    """Each dL_meta/dlambda_i against central differences of the look-ahead objective (model copy +
    real SGD step with the per-anchor threshold vector), as the scalar / pos_neg test does."""
    eta = 0.5
    loss_fn, miner = LOSSES[loss_name](), AdaptiveToleranceASMS(margin=0.3)
    model, batch = make_model(1, bn=bn), make_batch(1)
    policy = _policy(mode="exact", inner_lr=eta, exact_impl=impl)
    lam0 = policy.lam.clone().repeat(len(batch.labels))
    f = _objective(copy.deepcopy(model), loss_fn, _selection(model, miner, batch), batch, policy.meta_lam.clone(),
                   eta)
    expected = central_difference(f, lam0)
    assert (expected.abs() > 1e-6).sum() >= 3
    policy.step(model, loss_fn, miner, batch)
    torch.testing.assert_close(policy.last_anchor_grad, expected, rtol=1e-6, atol=1e-10)


def _first_order_objective(model, loss_fn, selection, batch, meta_lam, eta):
    """lambda -> -eta <grad L_meta(theta), grad_theta L_train(theta, lambda)>: the look-ahead to first
    order in eta (its lambda-free part dropped), the objective whose derivative mode=jvp computes."""
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    meta_emb = m(batch.meta_images)
    meta = loss_fn(meta_emb @ meta_emb.T, PairSelection.all_pairs(batch.meta_labels), threshold=meta_lam)
    v = torch.autograd.grad(meta, params, allow_unused=True)

    def f(lam):
        emb = m(batch.images)
        grads = torch.autograd.grad(loss_fn(emb @ emb.T, selection, threshold=lam), params, allow_unused=True)
        return -eta * sum((a * b).sum() for a, b in zip(v, grads) if a is not None and b is not None)

    return f


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("bn", [None, "eval"])
def test_jvp_per_anchor_meta_gradient_equals_finite_differences(reuse, loss_name, bn):
    eta = 0.5
    loss_fn, miner = LOSSES[loss_name](), AdaptiveToleranceASMS(margin=0.3)
    model, batch = make_model(2, bn=bn), make_batch(2)
    policy = _policy(mode="jvp", inner_lr=eta, jvp_reuse_forward=reuse)
    lam0 = policy.lam.clone().repeat(len(batch.labels))
    f = _first_order_objective(model, loss_fn, _selection(model, miner, batch), batch, policy.meta_lam.clone(), eta)
    expected = central_difference(f, lam0)
    assert (expected.abs() > 1e-6).sum() >= 3
    policy.step(model, loss_fn, miner, batch)
    torch.testing.assert_close(policy.last_anchor_grad, expected, rtol=1e-6, atol=1e-10)
    # ... and it is not the exact (second-order) gradient at this eta
    exact = _policy(mode="exact", inner_lr=eta)
    exact.step(make_model(2, bn=bn), loss_fn, miner, batch)
    assert (exact.last_anchor_grad - policy.last_anchor_grad).norm() > 1e-3 * expected.norm()


def _expected_anchor_thresholds(lam0, g, step_rule, lr, eta, eps, lo, hi):
    """The documented per-anchor step of a policy's first meta step, from scratch."""
    if step_rule == "sign":
        step = lr * torch.sign(g)
    else:  # first Adam step: v_hat = (G / eta)^2
        step = lr * (len(g) * g / eta) / ((g.sum() / eta).abs() + eps)
    return (lam0 - step).clamp(lo, hi)


@pytest.mark.parametrize("mode", ["exact", "jvp"])
@pytest.mark.parametrize("step_rule", ["adam", "sign"])
def test_real_loss_uses_the_per_anchor_thresholds(mode, step_rule):
    """The step's loss is loss(S, selection, lambda*) with lambda*_i = clamp(lambda - step_i): its
    value and the parameter update equal a plain step on a twin model; lambda itself takes the scalar
    step (sign: exactly lr against sign(sum g))."""
    eta, lr, loss_fn = 0.1, 0.02, LOSSES["soft_contrastive"]()
    model, batch, miner = make_model(3), make_batch(3), AdaptiveToleranceASMS(margin=0.3)
    twin = copy.deepcopy(model)
    policy = _policy(mode=mode, inner_lr=eta, lr=lr, step_rule=step_rule, min=0.0, max=0.51)
    out = policy.step(model, loss_fn, miner, batch)
    g = policy.last_anchor_grad
    expected = _expected_anchor_thresholds(torch.tensor(0.5, dtype=torch.float64), g, step_rule, lr, eta,
                                           policy.eps, 0.0, 0.51)
    torch.testing.assert_close(policy.last_anchor_thresholds, expected, rtol=1e-12, atol=1e-15)
    assert (expected < 0.5).any() and (expected == 0.51).any()  # both directions, and clamped
    assert len(set(expected.tolist())) >= (2 if step_rule == "sign" else 4)  # adam: graded per anchor
    scalar_step = lr * torch.sign(g.sum())  # the first normalised step (adam: up to eps)
    torch.testing.assert_close(policy.lam, (0.5 - scalar_step).clamp(0.0, 0.51), rtol=1e-6, atol=0)
    if step_rule == "adam":  # the mean per-anchor step is the scalar's first step, ~lr
        unclamped = 0.5 - _expected_anchor_thresholds(0.5, g, "adam", lr, eta, policy.eps, -math.inf, math.inf)
        torch.testing.assert_close(unclamped.mean(), scalar_step, rtol=1e-6, atol=0)
    used, logs = policy.last_anchor_thresholds, out.logs
    assert logs["train/lambda_anchor_min"] == used.min() and logs["train/lambda_anchor_max"] == used.max()
    assert logs["train/lambda_anchor_mean"] == used.mean()

    emb = twin(batch.images)
    sim = emb @ emb.T
    ref_loss = loss_fn(sim, miner(sim, batch.labels), threshold=expected)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-14, atol=0)
    assert out.loss != loss_fn(sim, miner(sim, batch.labels), threshold=policy.lam)  # not the scalar loss
    for m, loss in [(model, out.loss), (twin, ref_loss)]:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (k, p), (_, rp) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, rp, rtol=1e-13, atol=1e-15, msg=k)


def test_lambda_trajectory_and_state_equal_the_scalar_granularity_over_steps():
    loss_fn, miner = LOSSES["ms"](), AllPairsMiner()
    scalar, per_anchor = _policy("scalar", mode="jvp", lr=0.01), _policy(mode="jvp", lr=0.01)
    for seed in range(4):
        scalar.step(make_model(seed), loss_fn, miner, make_batch(seed))
        per_anchor.step(make_model(seed), loss_fn, miner, make_batch(seed))
        for key, value in scalar.state_dict().items():
            tol = {"rtol": 1e-10, "atol": 0} if value.is_floating_point() else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(per_anchor.state_dict()[key], value, msg=key, **tol)
    assert int(per_anchor.step_count) == 4 and per_anchor.lam != 0.5


def test_skipped_update_gives_every_anchor_lambda():
    loss_fn, miner = LOSSES["ms"](), AllPairsMiner()
    policy = _policy(mode="exact")
    batch = make_batch(6, meta_classes=1, meta_k=1)  # one meta image: no meta pair, gradient 0
    out = policy.step(make_model(6), loss_fn, miner, batch)
    assert out.logs["meta/skipped"] == 1
    assert torch.equal(policy.last_anchor_thresholds, torch.full((len(batch.labels),), 0.5, dtype=torch.float64))
    emb = make_model(6)(batch.images)
    torch.testing.assert_close(out.loss, loss_fn(emb @ emb.T, miner(emb @ emb.T, batch.labels), threshold=0.5),
                               rtol=1e-14, atol=0)


def test_logs_state_layout_and_resume():
    """Same state as scalar (0-d lambda, no per-anchor buffer); logs are 0-d; a checkpoint round trip
    (also from a scalar-granularity state) continues identically; held steps use lambda."""
    loss_fn, miner = LOSSES["soft_contrastive"](), AllPairsMiner()
    policy = _policy(mode="jvp", lr=0.01)
    for seed in range(2):
        out = policy.step(make_model(seed), loss_fn, miner, make_batch(seed))
    assert set(out.logs) == {"train/lambda", "meta/loss", "meta/grad_lambda", "meta/skipped",
                             "train/lambda_anchor_mean", "train/lambda_anchor_min", "train/lambda_anchor_max"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    state = copy.deepcopy(policy.state_dict())
    scalar_state = _policy("scalar").state_dict()
    assert set(state) == set(scalar_state)
    assert all(state[k].shape == scalar_state[k].shape for k in state)

    restored = MetaThreshold(granularity="per_anchor", mode="jvp", lr=0.01, min=0.0, max=1.0).double()
    restored.load_state_dict(state)
    out_a = policy.step(make_model(7), loss_fn, miner, make_batch(7))
    out_b = restored.step(make_model(7), loss_fn, miner, make_batch(7))
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    assert torch.equal(policy.last_anchor_thresholds, restored.last_anchor_thresholds)
    for k, v in policy.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k

    held = _policy(mode="jvp", every=2)
    batch = make_batch(8)
    batch.global_step = 1
    out = held.step(make_model(8), loss_fn, miner, batch)
    assert set(out.logs) == {"meta/held", "train/lambda"}
    emb = make_model(8)(batch.images)
    torch.testing.assert_close(out.loss, loss_fn(emb @ emb.T, miner(emb @ emb.T, batch.labels), threshold=0.5),
                               rtol=1e-14, atol=0)


def test_config_values():
    policy = instantiate(OmegaConf.merge(OmegaConf.load(CONF), {"granularity": "per_anchor", "init": 0.5}))
    assert policy.granularity == "per_anchor" and policy.lam.shape == ()
    with pytest.raises(ValueError, match=r"threshold_policy.init must be a number for granularity='per_anchor'"):
        MetaThreshold(granularity="per_anchor", init=[0.5, 0.6])
    with pytest.raises(ConfigError, match=re.escape(
            "threshold_policy.granularity must be one of ('scalar', 'pos_neg', 'per_anchor'), got 'per_pair'")):
        MetaThreshold(granularity="per_pair")
    for bad in ("per_anchor", "per_pair"):
        with pytest.raises(ConfigError, match=re.escape(
                f"threshold_policy.granularity must be one of ('scalar', 'pos_neg') for threshold_policy=hypergrad, "
                f"got '{bad}'")) as info:
            HypergradThreshold(granularity=bad)
        assert "no meaning across steps" in str(info.value)
    HypergradThreshold(granularity="pos_neg", init=[0.5, 0.5])  # the allowed ones still are


def test_per_anchor_reference_is_the_formula():
    """Guard for the references themselves: one anchor, numbers by hand (MS, a = 2, b = 10)."""
    sim = torch.tensor([[0.8, 0.1]], dtype=torch.float64)
    pos, neg = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    lam = torch.tensor([0.6], dtype=torch.float64)
    by_hand = math.log(1 + math.exp(-2 * 0.2)) / 2 + math.log(1 + math.exp(10 * -0.5)) / 10
    assert ref_ms(sim, pos, neg, lam, 2.0, 10.0).item() == pytest.approx(by_hand, rel=1e-14)
    softplus = F.softplus(torch.tensor(-0.4)).item()
    assert ref_mean_softplus(sim, pos, neg, lam, 2.0, 10.0, 1.0, 0.0).item() == pytest.approx(softplus, rel=1e-6)


def test_cli_run_logs_the_per_anchor_thresholds(tmp_path):
    """A tiny run through the CLI (synthetic set, module, CSV logger): the per-anchor statistics are
    logged beside the scalar lambda, and the thresholds used straddle it."""
    import csv

    from tests.test_train_cli import run_cli

    r = run_cli("threshold_policy=meta", "threshold_policy.granularity=per_anchor", "threshold_policy.lr=0.01",
                "data.meta_batch_size=4", "data.meta_K=2", "loss.threshold=0.6", "trainer.max_epochs=1",
                "trainer.accelerator=cpu", "evaluate_before_training=false", "test_after_training=false",
                "logger=csv", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/lambda_anchor_mean")]
    assert rows
    for row in rows:
        lo, mean, hi = (float(row[f"train/lambda_anchor_{k}"]) for k in ("min", "mean", "max"))
        assert 0.3 <= lo <= mean <= hi <= 0.9 and lo < hi
        assert 0.3 <= float(row["train/lambda"]) <= 0.9
