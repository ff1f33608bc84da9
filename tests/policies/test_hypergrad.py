"""threshold_policy=hypergrad: the forward-mode hypergradient against central differences of the
K-step unrolled training (float64, tiny model), written the plain way (model copy, real optimiser)."""

from __future__ import annotations

import copy

import pytest
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.losses.retrieval_objectives import OBJECTIVES
from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.policies import HypergradThreshold, MetaThreshold
from tests.policies.problems import LOSSES, central_difference, make_batch, make_model

K = 4
SGD = dict(lr=0.2, momentum=0.9, weight_decay=1e-2)


def meta_loss_at(model, loss_fn, batch, meta_lam, objective="loss", temperature=None):
    emb = model(batch.meta_images)
    if objective != "loss":
        return OBJECTIVES[objective](emb @ emb.T, batch.meta_labels, temperature)
    return loss_fn(emb @ emb.T, PairSelection.all_pairs(batch.meta_labels), threshold=meta_lam)


def unrolled_meta_loss(model0, loss_fn, batches, lams, make_opt, step_fn=None, **objective):
    """L_meta(theta_K) after K plain training steps of a copy of ``model0``, step k at threshold
    ``lams[k]`` (all pairs); the meta loss of ``batches[K]`` at lambda_0 = 0.5."""
    m = copy.deepcopy(model0)
    opt = make_opt(m.parameters())
    for k in range(len(lams)):
        emb = m(batches[k].images)
        loss = loss_fn(emb @ emb.T, PairSelection.all_pairs(batches[k].labels), threshold=lams[k])
        opt.zero_grad()
        loss.backward()
        if step_fn is None:
            opt.step()
        else:
            step_fn(opt, k)
    with torch.no_grad():
        return meta_loss_at(m, loss_fn, batches[len(lams)], torch.tensor(0.5, dtype=torch.float64), **objective)


def policy_hypergradient(model0, loss_fn, batches, make_opt, **policy_kwargs):
    """Run K real steps through the policy (lr=0: lambda fixed) and return h at theta_K."""
    model = copy.deepcopy(model0)
    opt = make_opt(model.parameters())
    kwargs = dict(init=0.5, lr=0.0, meta_threshold=0.5)
    kwargs.update(policy_kwargs)
    policy = HypergradThreshold(**kwargs).double()
    miner = AllPairsMiner()
    for k in range(K + 1):
        out = policy.step(model, loss_fn, miner, batches[k])
        if k == K:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        policy.after_optimizer_step(opt)
    key = "meta/grad_lambda" if policy.granularity == "scalar" else None
    if key:
        return out.logs[key].double()
    return torch.stack([out.logs["meta/grad_lambda_pos"], out.logs["meta/grad_lambda_neg"]]).double()


def batches_for(seed=0):
    return [make_batch(seed + k) for k in range(K + 1)]


@pytest.mark.parametrize("bn", [None, "train"])
@pytest.mark.parametrize("opt_kwargs", [SGD, dict(SGD, nesterov=True), dict(lr=0.3)], ids=["momentum", "nesterov", "plain"])
def test_sgd_hypergradient_is_exact(loss_fn, bn, opt_kwargs):
    model0, batches = make_model(0, bn=bn), batches_for()
    make_opt = lambda p: torch.optim.SGD(p, **opt_kwargs)  # noqa: E731
    h = policy_hypergradient(model0, loss_fn, batches, make_opt)
    fd = central_difference(
        lambda lam: unrolled_meta_loss(model0, loss_fn, batches, [lam] * K, make_opt), torch.tensor(0.5, dtype=torch.float64)
    )
    assert fd.abs() > 1e-6  # the problem is not degenerate
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("objective", ["smooth_ap", "nca"])
def test_lambda_free_meta_objectives_are_exact(objective):
    loss_fn, model0, batches = LOSSES["ms"](), make_model(2), batches_for(11)
    make_opt = lambda p: torch.optim.SGD(p, **SGD)  # noqa: E731
    h = policy_hypergradient(model0, loss_fn, batches, make_opt, meta_objective=objective, meta_temperature=0.2)
    fd = central_difference(
        lambda lam: unrolled_meta_loss(model0, loss_fn, batches, [lam] * K, make_opt, objective=objective,
                                       temperature=0.2),
        torch.tensor(0.5, dtype=torch.float64))
    assert fd.abs() > 1e-7
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-11)


def test_pos_neg_components_are_exact():
    loss_fn, model0, batches = LOSSES["ms"](), make_model(1), batches_for(3)
    make_opt = lambda p: torch.optim.SGD(p, **SGD)  # noqa: E731
    h = policy_hypergradient(model0, loss_fn, batches, make_opt, granularity="pos_neg", init=[0.5, 0.5],
                             meta_threshold=[0.5, 0.5])
    fd = central_difference(
        lambda lam: unrolled_meta_loss(model0, loss_fn, batches, [lam] * K, make_opt),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
    )
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-10)


def test_truncation_and_decay_weight_the_steps():
    """truncate=2: h is the derivative w.r.t. the lambda of the last 2 steps only; decay=mu (plain SGD):
    w.r.t. a lambda perturbed by mu^(K-1-k) at step k."""
    loss_fn, model0, batches = LOSSES["soft_contrastive"](), make_model(2), batches_for(5)
    make_opt = lambda p: torch.optim.SGD(p, lr=0.3)  # noqa: E731
    lam0 = torch.tensor(0.5, dtype=torch.float64)
    h = policy_hypergradient(model0, loss_fn, batches, make_opt, truncate=2)
    fd = central_difference(
        lambda lam: unrolled_meta_loss(model0, loss_fn, batches, [lam0, lam0, lam, lam], make_opt), lam0)
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-10)
    mu = 0.5
    h = policy_hypergradient(model0, loss_fn, batches, make_opt, decay=mu)
    fd = central_difference(
        lambda lam: unrolled_meta_loss(
            model0, loss_fn, batches, [lam0 + mu ** (K - 1 - k) * (lam - lam0) for k in range(K)], make_opt),
        lam0)
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_hypergradient_is_exact(decoupled):
    """Both moments carry tangents: exact against the real torch Adam / AdamW run."""
    loss_fn, model0, batches = LOSSES["ms"](), make_model(4), batches_for(7)
    hp = dict(lr=0.02, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8)
    adam = torch.optim.AdamW if decoupled else torch.optim.Adam
    make_opt = lambda p: adam(p, **hp)  # noqa: E731
    h = policy_hypergradient(model0, loss_fn, batches, make_opt)
    fd = central_difference(
        lambda lam: unrolled_meta_loss(model0, loss_fn, batches, [lam] * K, make_opt), torch.tensor(0.5, dtype=torch.float64)
    )
    assert fd.abs() > 1e-6
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-10)


def test_rmsprop_runs_and_other_optimisers_are_refused():
    loss_fn, model0, batches = LOSSES["ms"](), make_model(0), batches_for()
    h = policy_hypergradient(model0, loss_fn, batches, lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9))
    assert torch.isfinite(h) and h != 0
    with pytest.raises(ConfigError, match="Adagrad has no tangent rule"):
        policy_hypergradient(model0, loss_fn, batches, lambda p: torch.optim.Adagrad(p, lr=1e-2))


def test_head_only_tangent_tracks_the_head():
    loss_fn, model0, batches = LOSSES["ms"](), make_model(0), batches_for()
    model0.head = model0.fc2  # the Embedder's name for the last layer
    del model0.fc2
    model0.forward = lambda x: torch.nn.functional.normalize(model0.head(torch.tanh(model0.bn(model0.fc1(x)))), dim=1)
    policy = HypergradThreshold(init=0.5, meta_params="head").double()
    policy.step(model0, loss_fn, AllPairsMiner(), batches[0])
    assert policy.tangent.shape == (1, sum(p.numel() for p in model0.head.parameters()))
    with pytest.raises(ConfigError, match="meta_params=head"):
        HypergradThreshold(init=0.5, meta_params="head").step(make_model(0), loss_fn, AllPairsMiner(), batches[0])


def test_tangent_state_round_trips_through_a_state_dict():
    loss_fn, model, batches = LOSSES["ms"](), make_model(0), batches_for()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    policy = HypergradThreshold(init=0.5, lr=1e-2).double()
    for k in range(3):
        out = policy.step(model, loss_fn, AllPairsMiner(), batches[k])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        policy.after_optimizer_step(opt)
    fresh = HypergradThreshold(init=0.7).double()
    fresh.load_state_dict(policy.state_dict())
    for name, buf in policy.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name].to(buf.dtype), buf, rtol=0, atol=0)
    assert policy.tangent.abs().sum() > 0 and float(policy.lam) != 0.5


@pytest.mark.parametrize("policy_cls", [MetaThreshold, HypergradThreshold])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_state_stays_float32_under_a_precision_cast(policy_cls, dtype):
    policy = policy_cls(init=0.7, lr=1e-3, step_rule="sign").to(dtype)
    assert all(b.dtype == torch.float32 for n, b in policy.named_buffers() if b.is_floating_point())
    assert policy.to(torch.float64).lam.dtype == torch.float64  # upcasts apply (the float64 tests)
    policy = policy_cls(init=0.7, lr=1e-3, step_rule="sign").to(dtype)
    policy.update(torch.tensor(1.0, dtype=dtype))
    assert float(policy.lam) == pytest.approx(0.699, abs=1e-7)  # bf16 would have stayed 0.69921875


@pytest.mark.parametrize("total", [100, 1000])
def test_run_length_schedule_spreads_the_travel_over_the_run(total):
    policy = HypergradThreshold(init=0.5, lr_schedule="run_length", travel=2.0, min=0.3, max=0.9)
    assert policy.step_size() == policy.lr  # run length unknown: the constant lr
    policy.set_run_length(total)
    sizes = []
    for t in range(total):
        policy.tangent_steps.fill_(t)
        sizes.append(policy.step_size())
    assert sum(sizes) == pytest.approx(2.0 * 0.6 * (total + 1) / total)
    assert sizes[0] == pytest.approx(2 * 2.0 * 0.6 / total) and sizes[-1] < sizes[0] * 1e-3
    policy.tangent_steps.fill_(0)
    policy.update(torch.tensor(1.0))  # the Adam direction at its first step is 1: lambda moves by step_size
    assert float(policy.lam) == pytest.approx(0.5 - 2 * 2.0 * 0.6 / total, abs=1e-6)


def test_learned_margin_hypergradient_is_exact():
    """learn_margin: the train loss is the MS loss on soft-ASMS-weighted pairs; h_m against central
    differences of the unrolled training in m (SGD: exact)."""
    from ddtas_lightning.miners.soft_asms import soft_asms_weights

    loss_fn, model0, batches = LOSSES["ms"](), make_model(3), batches_for(13)
    make_opt = lambda p: torch.optim.SGD(p, **SGD)  # noqa: E731
    T = 0.05

    def unrolled(m):
        net = copy.deepcopy(model0)
        opt = make_opt(net.parameters())
        for k in range(K):
            emb = net(batches[k].images)
            s = emb @ emb.T
            sel = PairSelection.all_pairs(batches[k].labels)
            w_pos, w_neg = soft_asms_weights(s, sel.pos_mask, sel.neg_mask, m, T, detach_sim=False)
            loss = loss_fn(s, sel, threshold=torch.tensor(0.5, dtype=torch.float64), weights=w_pos + w_neg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return meta_loss_at(net, loss_fn, batches[K], torch.tensor(0.5, dtype=torch.float64))

    model = copy.deepcopy(model0)
    opt = make_opt(model.parameters())
    policy = HypergradThreshold(init=0.5, lr=0.0, meta_threshold=0.5, learn_margin=True, margin=0.1,
                                margin_temperature=T).double()
    policy.lr_schedule = "constant"
    for k in range(K + 1):
        if k == K:  # read h at theta_K without moving m
            policy.margin_max = policy.margin_min = float(policy.margin)
        out = policy.step(model, loss_fn, AllPairsMiner(), batches[k])
        if k < K:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            policy.after_optimizer_step(opt)
    assert float(policy.margin) == pytest.approx(0.1, abs=1e-7)  # lr 0: neither lambda nor m moved...
    fd = central_difference(unrolled, torch.tensor(0.1, dtype=torch.float64))
    assert fd.abs() > 1e-7
    torch.testing.assert_close(out.logs["meta/grad_margin"].double(), fd, rtol=1e-6, atol=1e-11)
