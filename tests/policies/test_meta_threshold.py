"""MetaThreshold (threshold_policy=meta, DDTAS's OTG) on tiny float64 problems."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.losses import SoftContrastiveLoss
from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS
from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.policies import MetaThreshold
from ddtas_lightning.policies.base import StepBatch
from tests.policies.problems import central_difference, make_batch, make_model, reference_meta_objective

CONF = Path(__file__).resolve().parents[2] / "conf" / "threshold_policy" / "meta.yaml"
INIT = {"scalar": 0.5, "pos_neg": [0.55, 0.45]}


def _policy(granularity="scalar", mode="exact", **kw) -> MetaThreshold:
    kw = {"init": INIT[granularity], "min": 0.0, "max": 1.0, "mode": mode, **kw}
    return MetaThreshold(granularity=granularity, **kw).double()


def _grad(out, granularity) -> torch.Tensor:
    if granularity == "scalar":
        return out.logs["meta/grad_lambda"]
    return torch.stack([out.logs["meta/grad_lambda_pos"], out.logs["meta/grad_lambda_neg"]])


def _selection(model, miner, batch) -> PairSelection:
    emb = copy.deepcopy(model)(batch.images)
    return miner(emb @ emb.T, batch.labels)


def _objective(model, loss_fn, selection, batch, meta_lam, eta):
    """lambda -> L_meta(theta'(lambda)) by the plain reference (model copy + real SGD step)."""
    return lambda lam: reference_meta_objective(model, loss_fn, selection, batch, lam, meta_lam, eta)


# ---- the meta gradient ---------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["identity", "double_backward"])
@pytest.mark.parametrize("granularity", ["scalar", "pos_neg"])
@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_exact_meta_gradient_equals_finite_differences(loss_fn, granularity, bn, impl):
    eta = 0.5  # large, so that the second-order terms matter (the jvp mode must fail this)
    model, batch = make_model(1, bn=bn), make_batch(1)
    miner = AdaptiveToleranceASMS(margin=0.3)
    selection = _selection(model, miner, batch)
    policy = _policy(granularity, "exact", inner_lr=eta, exact_impl=impl)
    lam0 = policy.lam.clone()  # INIT rounded to the buffers' float32
    f = _objective(copy.deepcopy(model), loss_fn, selection, batch, lam0, eta)
    expected = central_difference(f, lam0)
    assert expected.abs().max() > 1e-4  # a problem where lambda matters

    out = policy.step(model, loss_fn, miner, batch)
    torch.testing.assert_close(_grad(out, granularity), expected, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(out.logs["meta/loss"], f(lam0), rtol=1e-12, atol=0)

    first_order = _policy(granularity, "jvp", inner_lr=eta).step(make_model(1, bn=bn), loss_fn, miner, batch)
    rel = (_grad(first_order, granularity) - expected).norm() / expected.norm()
    assert rel > 1e-3  # the test discriminates second order from first order


@pytest.mark.parametrize("granularity", ["scalar", "pos_neg"])
@pytest.mark.parametrize("reuse", [True, False])
def test_jvp_converges_linearly_to_the_exact_gradient(loss_fn, granularity, reuse):
    batch, miner = make_batch(2), AllPairsMiner()
    errors = []
    for eta in (1e-3, 1e-4, 1e-5):  # (the tiny problem is strongly curved: at 1e-1 the error is ~100%)
        exact = _policy(granularity, "exact", inner_lr=eta).step(make_model(2), loss_fn, miner, batch)
        jvp = _policy(granularity, "jvp", inner_lr=eta, jvp_reuse_forward=reuse).step(
            make_model(2), loss_fn, miner, batch
        )
        g_exact, g_jvp = _grad(exact, granularity), _grad(jvp, granularity)
        assert g_exact.abs().min() > 0
        errors.append(float((g_jvp - g_exact).norm() / g_exact.norm()))
    assert errors[-1] < 1e-2, errors
    for coarse, fine in zip(errors, errors[1:]):
        assert 5 < coarse / fine < 20, errors  # first order: error ~ eta


MODES = {  # id -> MetaThreshold keyword arguments
    "exact": {"mode": "exact"},
    "exact-double_backward": {"mode": "exact", "exact_impl": "double_backward"},
    "jvp": {"mode": "jvp"},
    "jvp-separate": {"mode": "jvp", "jvp_reuse_forward": False},
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("granularity", ["scalar", "pos_neg"])
@pytest.mark.parametrize("step_rule", ["adam", "sign"])
def test_update_lowers_the_meta_objective(loss_fn, mode, granularity, step_rule):
    eta, lr = 0.1, 1e-3
    model, batch = make_model(3), make_batch(3)
    miner = AllPairsMiner()
    policy = _policy(granularity, inner_lr=eta, lr=lr, step_rule=step_rule, **MODES[mode])
    lam0 = policy.lam.clone()
    f = _objective(copy.deepcopy(model), loss_fn, _selection(model, miner, batch), batch, lam0, eta)
    out = policy.step(model, loss_fn, miner, batch)
    grad, step = _grad(out, granularity), policy.lam - lam0
    # a normalised first step: |step| = lr per component (Adam's first step is lr * g / (|g| + eps))
    torch.testing.assert_close(step.abs(), torch.full_like(step, lr), rtol=1e-4, atol=0)
    assert torch.equal(torch.sign(step), -torch.sign(grad))
    assert f(policy.lam) < f(lam0)
    assert out.logs["meta/skipped"] == 0


@pytest.mark.parametrize("granularity", ["scalar", "pos_neg"])
def test_lambda_stays_within_bounds(loss_fn, granularity):
    batch, miner = make_batch(4), AllPairsMiner()
    policy = MetaThreshold(init=0.5, granularity=granularity, min=0.45, max=0.52, lr=0.2).double()
    seen = []
    for seed in range(4):
        policy.step(make_model(seed), loss_fn, miner, make_batch(seed))
        assert (policy.lam >= 0.45).all() and (policy.lam <= 0.52).all()
        seen.append(policy.lam.clone())
    assert any(((s == 0.45) | (s == 0.52)).any() for s in seen)  # the clamp was active
    with pytest.raises(ValueError, match="outside"):
        MetaThreshold(init=0.95, granularity=granularity)  # default bounds [0.3, 0.9]
    with pytest.raises(ValueError, match="outside"):  # init=None: checked against the loss's threshold
        MetaThreshold(min=0.8, max=0.9).step(make_model(0), loss_fn, miner, batch)


# ---- state -----------------------------------------------------------------------------------------
def test_init_from_the_loss_and_meta_threshold(loss_fn):
    batch, miner = make_batch(5), AllPairsMiner()
    loss_fn.threshold = 0.6
    policy = MetaThreshold(mode="jvp").double()
    assert not policy.initialized and policy.current_threshold() is None
    policy.step(make_model(5), loss_fn, miner, batch)
    assert policy.initialized and float(policy.meta_lam) == pytest.approx(0.6)
    assert abs(float(policy.lam) - 0.6) == pytest.approx(1e-3, rel=1e-4)
    # jvp logs the meta loss at theta: it must be the unmined loss at the fixed meta threshold
    policy = MetaThreshold(mode="jvp", meta_threshold=0.4, init=0.7).double()
    out = policy.step(make_model(5), loss_fn, miner, batch)
    emb = make_model(5)(batch.meta_images)
    expected = loss_fn(emb @ emb.T, PairSelection.all_pairs(batch.meta_labels), threshold=0.4)
    torch.testing.assert_close(out.logs["meta/loss"], expected.detach())
    assert float(policy.meta_lam) == pytest.approx(0.4)


@pytest.mark.parametrize("granularity", ["scalar", "pos_neg"])
def test_state_dict_round_trip_restores_lambda_and_adam_moments(loss_fn, granularity):
    miner = AllPairsMiner()
    policy = _policy(granularity, "jvp", lr=0.01)
    for seed in range(3):
        policy.step(make_model(seed), loss_fn, miner, make_batch(seed))
    state = copy.deepcopy(policy.state_dict())
    assert set(state) == {"lam", "meta_lam", "exp_avg", "exp_avg_sq", "step_count", "initialized"}
    assert int(state["step_count"]) == 3 and bool(state["initialized"])
    assert (state["exp_avg"] != 0).all() and (state["exp_avg_sq"] != 0).all()

    loss_fn.threshold = 0.35  # must not re-initialise a restored policy
    restored = MetaThreshold(granularity=granularity, mode="jvp", lr=0.01, min=0.0, max=1.0).double()
    restored.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(restored.state_dict()[k], v), k
    out_a = policy.step(make_model(7), loss_fn, miner, make_batch(7))
    out_b = restored.step(make_model(7), loss_fn, miner, make_batch(7))
    assert torch.equal(policy.lam, restored.lam) and torch.equal(policy.exp_avg, restored.exp_avg)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    # loading an uninitialised state into a used policy: it initialises again at the next step
    restored.load_state_dict(MetaThreshold(granularity=granularity).state_dict())
    assert restored.current_threshold() is None
    restored.step(make_model(8), loss_fn, miner, make_batch(8))
    torch.testing.assert_close(restored.meta_lam, torch.full_like(restored.meta_lam, 0.35))


@pytest.mark.parametrize("mode", ["exact", "jvp"])
def test_no_meta_information_skips_the_update(loss_fn, mode):
    policy = _policy("scalar", mode)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    batch = make_batch(6, meta_classes=1, meta_k=1)  # a single meta image: no pair, meta loss 0
    out = policy.step(make_model(6), loss_fn, AllPairsMiner(), batch)
    assert out.logs["meta/skipped"] == 1 and out.logs["meta/grad_lambda"] == 0
    batch.meta_images[0, 0] = float("nan")  # non-finite meta gradient
    batch.meta_images = torch.cat([batch.meta_images, batch.images[:3]])
    batch.meta_labels = torch.cat([batch.meta_labels, batch.labels[:3]])
    out = policy.step(make_model(6), loss_fn, AllPairsMiner(), batch)
    assert out.logs["meta/skipped"] == 1 and not torch.isfinite(out.logs["meta/grad_lambda"])
    assert torch.isfinite(out.loss)
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="meta batch"):
        policy.step(make_model(6), loss_fn, AllPairsMiner(), StepBatch(batch.images, batch.labels))


# ---- the real update -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("bn", [None, "train", "eval"])
def test_real_update_is_the_real_loss_only(loss_fn, mode, bn):
    """The virtual step leaves parameters, gradients and BN statistics alone; the module's backward
    + optimizer step then equal a plain step on loss(model(x), selection, lambda_new)."""
    model, batch = make_model(8, bn=bn), make_batch(8)
    twin = copy.deepcopy(model)
    miner = AdaptiveToleranceASMS(margin=0.3)
    params0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    policy = _policy("pos_neg", inner_lr=0.5, lr=0.05, **MODES[mode])
    out = policy.step(model, loss_fn, miner, batch)
    for k, p in model.named_parameters():
        assert torch.equal(p, params0[k]) and p.grad is None, k
    # BN statistics: updated once, by the train batch only (as a plain forward)
    emb = twin(batch.images)
    for (k, b), (_, rb) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, rb), k
    assert policy.lam[0] != 0.55  # lambda moved, so the check below is about the new lambda
    assert set(out.selection.stats) >= {"pos_pairs", "neg_pairs", "ratio"}  # the miner's stats

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.zero_grad()
    out.loss.backward()
    sgd.step()
    sgd_ref = torch.optim.SGD(twin.parameters(), lr=0.1)
    sim = emb @ emb.T
    ref_loss = loss_fn(sim, miner(sim, batch.labels), threshold=policy.lam.detach())
    sgd_ref.zero_grad()
    ref_loss.backward()
    sgd_ref.step()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-14, atol=0)
    for (k, p), (_, rp) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, rp, rtol=1e-13, atol=1e-15, msg=k)
        if not (bn == "train" and k == "fc1.bias"):  # (batch-mean subtraction cancels that bias)
            assert not torch.equal(p, params0[k]), k


def test_logs_are_zero_dim_tensors(loss_fn):
    for granularity, keys in [
        ("scalar", {"train/lambda", "meta/loss", "meta/grad_lambda", "meta/skipped"}),
        ("pos_neg", {"train/lambda_pos", "train/lambda_neg", "meta/loss", "meta/grad_lambda_pos",
                     "meta/grad_lambda_neg", "meta/skipped"}),
    ]:
        out = _policy(granularity).step(make_model(9), loss_fn, AllPairsMiner(), make_batch(9))
        assert set(out.logs) == keys
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in out.logs.values())


def test_real_embedder_with_frozen_bn_runs_every_mode():
    """timm backbone (BN frozen as in the papers) + AT-ASMS + SoftContrastive, float32."""
    from ddtas_lightning.models import Embedder

    torch.manual_seed(0)
    model = Embedder("resnet10t", dim=16, freeze_bn=True).train()
    g = torch.Generator().manual_seed(0)
    batch = StepBatch(
        torch.randn(8, 3, 32, 32, generator=g), torch.arange(4).repeat_interleave(2),
        meta_images=torch.randn(6, 3, 32, 32, generator=g), meta_labels=torch.arange(3).repeat_interleave(2),
    )
    grads = {}
    for mode in sorted(MODES):
        policy = MetaThreshold(**MODES[mode])
        out = policy.step(model, SoftContrastiveLoss(), AdaptiveToleranceASMS(), batch)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        grads[mode] = out.logs["meta/grad_lambda"]
        assert float(policy.lam) != 0.7
    assert grads["exact"] != 0
    for mode in MODES:
        torch.testing.assert_close(grads[mode], grads["exact"], rtol=1e-2, atol=0, msg=mode)


# ---- config ------------------------------------------------------------------------------------------
def test_config_instantiates_with_the_documented_defaults():
    cfg = OmegaConf.load(CONF)
    policy = instantiate(cfg)
    assert isinstance(policy, MetaThreshold) and policy.needs_meta_batch
    import inspect

    signature = inspect.signature(MetaThreshold.__init__).parameters
    keys = set(cfg) - {"_target_"}
    assert keys == set(signature) - {"self"}  # every constructor argument is in the config
    for key in keys:  # and the config repeats the constructor's defaults
        default = signature[key].default
        value = OmegaConf.to_object(cfg)[key]
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    # list-valued keys arrive as OmegaConf ListConfig
    cfg.granularity, cfg.init, cfg.meta_threshold = "pos_neg", [0.6, 0.4], [0.5, 0.5]
    policy = instantiate(cfg)
    assert policy.lam.tolist() == pytest.approx([0.6, 0.4]) and policy.meta_lam.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="granularity"):
        MetaThreshold(granularity="per_pair")
    with pytest.raises(ValueError, match=r"\[pos, neg\]"):
        MetaThreshold(granularity="pos_neg", init=[0.5, 0.5, 0.5])
