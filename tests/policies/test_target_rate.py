"""threshold_policy=target_rate (issue 23): lambda from the batch's pair-similarity quantile, EMA, clamp.

Every value is checked against a slow reference written from the formula in the module docstring with
plain Python lists and floats (no torch.quantile, no masks): the negative pairs' similarities collected by a
double loop, sorted, the linear-interpolation quantile at 1 - rho, then the EMA and the clamp."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.losses import SoftContrastiveLoss
from ddtas_lightning.miners.asms import ASMS
from ddtas_lightning.policies import StepBatch, TargetRateThreshold
from ddtas_lightning.policies.target_rate import masked_quantile
from tests.conftest import free_port
from tests.policies.problems import make_model


# ---- the reference ------------------------------------------------------------------------------------
def ref_pairs(sim, labels, side: str) -> list[float]:
    s, y = sim.tolist(), labels.tolist()
    out = []
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            if (side == "neg" and y[i] != y[j]) or (side == "pos" and y[i] == y[j]):
                out.append(float(s[i][j]))
    return out


def ref_quantile(values: list[float], prob: float) -> float:
    v = sorted(values)
    h = (len(v) - 1) * prob
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def ref_target(sim, labels, rate=0.5, side="neg") -> tuple[float | None, float]:
    """(q_t, rho_t); q_t None when the batch lacks the pairs."""
    neg, pos = ref_pairs(sim, labels, "neg"), ref_pairs(sim, labels, "pos")
    rho = min(1.0, len(pos) / max(len(neg), 1)) if rate == "balanced" else rate
    values = neg if side == "neg" else pos
    if not values:
        return None, rho
    return ref_quantile(values, 1 - rho if side == "neg" else rho), rho


def ref_run(sims, labels, start, beta, lo, hi, rate=0.5, side="neg") -> list[float]:
    """lambda after each batch: lambda <- clamp(beta lambda + (1 - beta) q, lo, hi); held without pairs."""
    lam, out = start, []
    for sim in sims:
        q, _ = ref_target(sim, labels, rate, side)
        if q is not None:
            lam = min(max(beta * lam + (1 - beta) * q, lo), hi)
        out.append(lam)
    return out


def random_sim(seed: int, n: int = 12, d: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return e @ e.T


LABELS = torch.arange(4).repeat_interleave(3)  # 4 classes x 3: 36 positive, 108 negative ordered pairs


# ---- the statistic ------------------------------------------------------------------------------------
def test_hand_made_batch():
    # 4 items, classes (0, 0, 1, 1): negatives (ordered) are S01-free pairs: (0,2),(0,3),(1,2),(1,3) twice
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.3],
                        [0.9, 1.0, 0.5, 0.7],
                        [0.1, 0.5, 1.0, 0.8],
                        [0.3, 0.7, 0.8, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # negatives sorted: 0.1 0.1 0.3 0.3 0.5 0.5 0.7 0.7 (n = 8); positives: 4 ordered pairs -> rho = 4/8
    # h = 7 * 0.5 = 3.5 -> q = 0.3 + 0.5 (0.5 - 0.3) = 0.4: 4 of the 8 negatives lie above
    p = TargetRateThreshold(rate="balanced", init=0.0, beta=0.0)
    q, rho, ok = p.batch_target(sim, labels)
    assert bool(ok) and float(rho) == 0.5
    assert float(q) == pytest.approx(0.4, abs=1e-7)
    # a fixed rate of 1/7: h = 7 * 6/7 = 6 -> the 7th value, 0.7 (one ordered pair per side... two above)
    q, rho, _ = TargetRateThreshold(rate=1 / 7, init=0.0).batch_target(sim, labels)
    assert float(q) == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("rate", ["balanced", 0.05, 0.3, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantile_matches_the_reference_on_random_batches(rate, seed):
    sim = random_sim(seed)
    q, rho, ok = TargetRateThreshold(rate=rate, init=0.0).batch_target(sim, LABELS)
    want_q, want_rho = ref_target(sim, LABELS, rate)
    assert bool(ok)
    assert float(rho) == pytest.approx(want_rho, rel=1e-12)
    assert float(q) == pytest.approx(want_q, abs=2e-7)
    # and the count it promises: ~rho n negatives above q (q lies between two order statistics, and each
    # unordered pair appears twice in a symmetric S)
    neg = ref_pairs(sim, LABELS, "neg")
    above = sum(v > float(q) for v in neg)
    assert abs(above - want_rho * len(neg)) <= 2 + 1e-9


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_positive_side_matches_the_reference(rate):
    sim = random_sim(5)
    q, _, ok = TargetRateThreshold(rate=rate, side="pos", init=0.0).batch_target(sim, LABELS)
    assert bool(ok) and float(q) == pytest.approx(ref_target(sim, LABELS, rate, "pos")[0], abs=2e-7)


def test_masked_quantile_on_an_unsorted_mask_with_ties():
    values = torch.tensor([[0.3, -1.0, 0.3], [0.2, 0.3, 5.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for prob in (0.0, 0.25, 0.5, 0.8, 1.0):
        q, n = masked_quantile(values, mask, torch.tensor(prob, dtype=torch.float64))
        assert int(n) == 4
        assert float(q) == pytest.approx(ref_quantile([0.3, 0.3, 0.2, 0.3], prob), abs=1e-7)


# ---- edge cases ---------------------------------------------------------------------------------------
def test_a_batch_without_negatives_holds_lambda():
    p = TargetRateThreshold(init=0.25, beta=0.5)
    logs = p.observe(random_sim(0, n=4), torch.zeros(4, dtype=torch.long), epoch=0)
    assert float(p.lam) == pytest.approx(0.25) and float(logs["train/lambda_held"]) == 1.0
    # positives-side without positives (every label distinct) holds too
    p = TargetRateThreshold(rate=0.2, side="pos", init=0.25, beta=0.5)
    logs = p.observe(random_sim(0, n=4), torch.arange(4), epoch=0)
    assert float(p.lam) == pytest.approx(0.25) and float(logs["train/lambda_held"]) == 1.0


def test_a_non_finite_similarity_holds_lambda():
    sim = random_sim(0)
    sim[0, 5] = float("nan")
    p = TargetRateThreshold(init=0.25, beta=0.5)
    assert float(p.observe(sim, LABELS, 0)["train/lambda_held"]) == 1.0 and float(p.lam) == pytest.approx(0.25)


def test_all_equal_similarities_give_that_value():
    p = TargetRateThreshold(init=0.0, beta=0.0)
    p.observe(torch.full((12, 12), 0.37), LABELS, 0)
    assert float(p.lam) == pytest.approx(0.37)


def test_clamping_to_min_and_max():
    sim = random_sim(3)
    q, _ = ref_target(sim, LABELS)  # the default rate, 0.5
    hi = TargetRateThreshold(init=q - 0.2, beta=0.0, min=q - 0.3, max=q - 0.1)
    hi.observe(sim, LABELS, 0)
    assert float(hi.lam) == pytest.approx(q - 0.1)
    lo = TargetRateThreshold(init=q + 0.2, beta=0.0, min=q + 0.1, max=q + 0.3)
    lo.observe(sim, LABELS, 0)
    assert float(lo.lam) == pytest.approx(q + 0.1)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="threshold_policy.rate"):
        TargetRateThreshold(rate=1.5)
    with pytest.raises(ConfigError, match="side=neg"):
        TargetRateThreshold(rate="balanced", side="pos")  # balanced is a rate of the negatives
    with pytest.raises(ConfigError, match="threshold_policy.beta"):
        TargetRateThreshold(beta=1.0)
    with pytest.raises(ConfigError, match="outside"):
        TargetRateThreshold(init=0.9, min=0.0, max=0.5)


# ---- over steps, through the policy's own step ---------------------------------------------------------
def batches(n: int, seed: int = 0) -> list[StepBatch]:
    g = torch.Generator().manual_seed(100 + seed)
    return [StepBatch(torch.randn(12, 6, generator=g, dtype=torch.float64), LABELS, epoch=e // 3, global_step=e)
            for e in range(n)]


def step_sims(model, steps: list[StepBatch]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [(lambda e: e @ e.T)(model(b.images)) for b in steps]


@pytest.mark.parametrize("rate", [0.5, "balanced", 0.2])
def test_ema_over_steps_and_the_loss_uses_the_new_lambda(rate):
    model, loss_fn, miner = make_model(0), SoftContrastiveLoss(scale_neg=10.0, threshold=0.6), ASMS()
    steps = batches(6)
    want = ref_run(step_sims(model, steps), LABELS, start=0.6, beta=0.7, lo=-1.0, hi=1.0, rate=rate)
    p = TargetRateThreshold(rate=rate, beta=0.7)  # init=None: the start is loss.threshold
    for b, lam in zip(steps, want):
        out = p.step(model, loss_fn, miner, b)  # no optimiser step: the model (and so S) stays the reference's
        assert float(p.lam) == pytest.approx(lam, abs=1e-6)
        assert float(out.logs["train/lambda"]) == pytest.approx(lam, abs=1e-6)
        sim = step_sims(model, [b])[0]
        ref_loss = loss_fn(sim, miner(sim, b.labels), threshold=float(p.lam))
        assert float(out.loss.detach()) == pytest.approx(float(ref_loss), rel=1e-6)
    assert want[0] != pytest.approx(want[-1], abs=1e-3)  # it moved


def test_epoch_update_holds_lambda_within_an_epoch():
    model, loss_fn, miner = make_model(0), SoftContrastiveLoss(scale_neg=10.0, threshold=0.5), ASMS()
    steps = batches(7)  # epochs 0, 0, 0, 1, 1, 1, 2
    sims = step_sims(model, steps)
    qs = [ref_target(s, LABELS)[0] for s in sims]
    beta = 0.25
    lam1 = beta * 0.5 + (1 - beta) * sum(qs[0:3]) / 3
    lam2 = beta * lam1 + (1 - beta) * sum(qs[3:6]) / 3
    want = [0.5, 0.5, 0.5, lam1, lam1, lam1, lam2]
    p = TargetRateThreshold(beta=beta, update="epoch")
    got = [float(p.step(model, loss_fn, miner, b).logs["train/lambda"]) for b in steps]
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("update", ["step", "epoch"])
def test_resume_from_a_state_dict_continues_exactly(update):
    model, miner = make_model(0), ASMS()
    steps = batches(7)
    whole = TargetRateThreshold(beta=0.6, update=update)
    for b in steps:
        whole.step(model, SoftContrastiveLoss(scale_neg=10.0, threshold=0.3), miner, b)
    first = TargetRateThreshold(beta=0.6, update=update)
    for b in steps[:4]:  # mid-epoch 1 in epoch mode: the accumulator travels
        first.step(model, SoftContrastiveLoss(scale_neg=10.0, threshold=0.3), miner, b)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert set(state) == {"lam", "initialized", "acc_sum", "acc_count", "epoch"}
    resumed = TargetRateThreshold(beta=0.6, update=update)
    resumed.load_state_dict(state)
    for b in steps[4:]:  # another loss.threshold: the loaded start must win over re-initialising
        resumed.step(model, SoftContrastiveLoss(scale_neg=10.0, threshold=-0.9), miner, b)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_state_stays_float32_under_low_precision_and_uses_sims_dtype():
    p = TargetRateThreshold(init=0.3).to(torch.bfloat16)
    assert p.lam.dtype == torch.float32
    p.observe(random_sim(0).to(torch.bfloat16), LABELS, 0)
    assert p.lam.dtype == torch.float32


# ---- DDP: every rank holds the same lambda, equal to the single process's --------------------------------
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, miner = make_model(0), ASMS()
        loss_fn = SoftContrastiveLoss(scale_neg=10.0, threshold=0.2)
        policy = TargetRateThreshold(beta=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        lams, losses = [], []
        for b in batches(4):
            rows = slice(rank * 6, (rank + 1) * 6)  # this rank's 2 classes x 3 images; labels stay global
            out = policy.step(model, loss_fn, miner, StepBatch(b.images[rows], b.labels, epoch=b.epoch))
            opt.zero_grad()
            out.loss.backward()
            for p in model.parameters():  # DDP's gradient averaging, by hand
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            lams.append(policy.lam.clone())
            losses.append(out.loss.detach().clone())
        torch.save({"lam": lams, "loss": losses}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_the_single_process_lambda(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, miner = make_model(0), ASMS()
    loss_fn = SoftContrastiveLoss(scale_neg=10.0, threshold=0.2)
    policy = TargetRateThreshold(beta=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s, b in enumerate(batches(4)):
        out = policy.step(model, loss_fn, miner, b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.equal(ranks[0]["lam"][s], ranks[1]["lam"][s]), f"step {s}: ranks differ"
        assert torch.equal(ranks[0]["loss"][s], ranks[1]["loss"][s])
        torch.testing.assert_close(ranks[0]["lam"][s], policy.lam, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ranks[0]["loss"][s], out.loss.detach(), rtol=1e-9, atol=1e-12)
    assert not torch.equal(ranks[0]["lam"][0], ranks[0]["lam"][-1])
