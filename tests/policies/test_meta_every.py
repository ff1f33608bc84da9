"""``threshold_policy.every=k``: the meta gradient every k optimiser steps, lambda held in between."""

from __future__ import annotations

import copy

import pytest
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS
from ddtas_lightning.policies import MetaThreshold
from tests.policies.problems import make_batch, make_model

STEPS = 7


def _policy(every=None, mode="jvp", **kw) -> MetaThreshold:
    kw = {"init": 0.5, "min": 0.0, "max": 1.0, "mode": mode, "lr": 0.02, **kw}
    if every is not None:
        kw["every"] = every
    return MetaThreshold(**kw).double()


def _train(policy, loss_fn, steps=range(STEPS), model=None, opt=None):
    """A little training loop as DMLModule runs it: policy step, backward, SGD step; the batch
    carries the optimiser steps taken so far. Returns lambda before/after each step, the losses
    and the model and optimiser (to go on from)."""
    model = make_model(0) if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5) if opt is None else opt
    miner = AdaptiveToleranceASMS()
    trace = []
    for t in steps:
        batch = make_batch(t)
        batch.global_step = t
        before = policy.lam.clone()
        out = policy.step(model, loss_fn, miner, batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        trace.append((before, policy.lam.clone(), out.loss.detach(), out.logs))
    return trace, model, opt


@pytest.mark.parametrize("mode", ["jvp", "exact"])
def test_lambda_is_held_between_meta_steps_and_moves_at_them(loss_fn, mode):
    trace, _, _ = _train(_policy(3, mode), loss_fn)
    for t, (before, after, _, logs) in enumerate(trace):
        if t % 3:
            assert torch.equal(before, after), f"lambda changed at held step {t}"
            assert float(logs["meta/held"]) == 1.0 and "meta/loss" not in logs
        else:
            assert not torch.equal(before, after), f"lambda did not move at meta step {t}"
            assert float(logs["meta/held"]) == 0.0 and "meta/grad_lambda" in logs
        assert torch.equal(logs["train/lambda"], after)


def test_held_step_is_the_static_step_at_the_held_lambda(loss_fn):
    """The loss of a held step equals the loss recomputed the plain way (embed, mine, loss at lambda)."""
    policy = _policy(2)
    model, miner = make_model(0), AdaptiveToleranceASMS()
    policy.step(model, loss_fn, miner, make_batch(0))  # step 0: a meta step, lambda moves
    batch = make_batch(1)
    batch.global_step = 1
    out = policy.step(model, loss_fn, miner, batch)
    emb = copy.deepcopy(model)(batch.images)
    sim = emb @ emb.T
    expected = loss_fn(sim, miner(sim, batch.labels), threshold=policy.lam.clone())
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    assert out.loss.requires_grad


@pytest.mark.parametrize("mode", ["jvp", "exact"])
def test_every_1_is_the_per_step_policy_bit_for_bit(loss_fn, mode):
    """every=1 equals the policy without the option (lambda, losses and weights), and every meta
    step of every=3 runs the very same computation (its first step equals every=1's first step)."""
    default, _ = _train(_policy(None, mode), loss_fn)[:2]
    ones, model_1 = _train(_policy(1, mode), loss_fn)[:2]
    _, model_d = _train(_policy(None, mode), loss_fn)[:2]
    for (_, lam_d, loss_d, _), (_, lam_1, loss_1, _) in zip(default, ones):
        assert torch.equal(lam_d, lam_1) and torch.equal(loss_d, loss_1)
    for p, q in zip(model_d.parameters(), model_1.parameters()):
        assert torch.equal(p, q)
    threes, _, _ = _train(_policy(3, mode), loss_fn, steps=range(1))
    assert torch.equal(threes[0][1], ones[0][1]) and torch.equal(threes[0][2], ones[0][2])


def test_resume_mid_period_continues_the_schedule(loss_fn):
    """Stopped after 4 steps (one step into a period of 3), state saved and loaded into fresh
    objects, then steps 4-6: lambda, Adam moments and weights equal the uninterrupted run's."""
    full_policy = _policy(3)
    full, model_full, _ = _train(full_policy, loss_fn)
    policy = _policy(3)
    _, model, opt = _train(policy, loss_fn, steps=range(4))
    saved = copy.deepcopy((policy.state_dict(), model.state_dict(), opt.state_dict()))
    fresh_policy = MetaThreshold(mode="jvp", lr=0.02, min=0.0, max=1.0, every=3).double()
    fresh_model = make_model(1)
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.5)
    fresh_policy.load_state_dict(saved[0])
    fresh_model.load_state_dict(saved[1])
    fresh_opt.load_state_dict(saved[2])
    rest, model_rest, _ = _train(fresh_policy, loss_fn, steps=range(4, STEPS), model=fresh_model, opt=fresh_opt)
    for t, (a, b) in enumerate(zip(full[4:], rest), start=4):
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), f"step {t} differs after resume"
    for p, q in zip(model_full.parameters(), model_rest.parameters()):
        assert torch.equal(p, q)
    for name, buf in full_policy.state_dict().items():
        assert torch.equal(buf, fresh_policy.state_dict()[name]), name
    assert int(fresh_policy.step_count) == 3  # meta steps 0, 3 and 6


@pytest.mark.parametrize("bad", [0, -2, 1.5, "x"])
def test_every_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="threshold_policy.every"):
        MetaThreshold(every=bad)
