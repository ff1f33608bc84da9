"""threshold_policy=many_heads (issue 23): K heads on one backbone = K grid runs in one.

The reference is the plain thing: K separate single-head trainings (an ``MLPEmbedder`` each, the static
policy at lambda_k, the same seed, batches and optimiser), run one after another. With nothing shared
(the cached-feature mode) or a frozen trunk, head k must follow run k to float tolerance; with a trainable
shared trunk, the trunk's gradient must be the mean of the K runs' trunk gradients (or one head's)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.heads_module import ManyHeadsModule, module_class, select_head
from ddtas_lightning.losses import SoftContrastiveLoss, TripletMarginLoss
from ddtas_lightning.miners.asms import ASMS
from ddtas_lightning.miners.random_hard import RandomHardMiner
from ddtas_lightning.models.many_heads import ManyHeads
from ddtas_lightning.models.mlp import MLPEmbedder
from ddtas_lightning.module import DMLModule
from ddtas_lightning.policies import ManyHeadsThreshold, StaticThreshold, StepBatch
from ddtas_lightning.policies.many_heads import halve, is_rung
from ddtas_lightning.runtime.run_record import ComputeMeter

LAMBDAS = (0.1, 0.4, 0.7)
LABELS = torch.arange(4).repeat_interleave(3)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mlp(seed: int = 0, batch_norm: bool = False) -> MLPEmbedder:
    torch.manual_seed(seed)
    return MLPEmbedder(in_dim=10, dim=6, hidden=[12], batch_norm=batch_norm).double()


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(12, 10, generator=g, dtype=torch.float64) for _ in range(n)]


def loss_and_miner(kind: str):
    if kind in ("asms", "batch_norm"):
        return SoftContrastiveLoss(scale_neg=10.0), ASMS()
    return TripletMarginLoss(threshold=0.2), RandomHardMiner(margin=0.2)  # a miner that draws at random


def train_single(lam: float, kind: str, steps: int, freeze=()) -> tuple[MLPEmbedder, list[float]]:
    """One grid run: the static policy at lambda (loss.threshold), Adam, its own generator (seed 0)."""
    model = make_mlp(batch_norm=kind == "batch_norm")
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(freeze) if freeze else True)
    loss_fn, miner = loss_and_miner(kind)
    loss_fn.threshold = lam
    outs = run_steps(model, StaticThreshold(), loss_fn, miner, steps)
    return model, [float(out.loss.detach()) for out in outs]


def run_steps(model, policy, loss_fn, miner, steps: int, before_step=None) -> list:
    """``steps`` Adam steps (lr 1e-2, trainable parameters only) of ``policy`` on the fixed batches, one
    seeded generator: the loop a grid run and a many-heads run share; returns every step's output.
    ``before_step(i)`` runs before step i (successive halving stops heads there)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    outs = []
    for i, x in enumerate(batches(steps)):
        if before_step is not None:
            before_step(i)
        out = policy.step(model, loss_fn, miner, StepBatch(x, LABELS, generator=gen))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        outs.append(out)
    return outs


def train_heads(kind: str, steps: int, split: str = "none", freeze=(), vmap_loss: bool = False, before_step=None):
    base = make_mlp(batch_norm=kind == "batch_norm")
    model = ManyHeads(base, len(LAMBDAS), split=split)
    if freeze:
        for p in model.trunk.parameters():
            p.requires_grad_(False)
    loss_fn, miner = loss_and_miner(kind)
    policy = ManyHeadsThreshold(LAMBDAS, split=split, vmap_loss=vmap_loss)
    outs = run_steps(model, policy, loss_fn, miner, steps,
                     before_step=None if before_step is None else lambda i: before_step(i, model))
    return model, [{k: float(v) for k, v in out.logs.items()} for out in outs], policy


@pytest.mark.parametrize("kind", ["asms", "random_miner", "batch_norm"])
def test_heads_without_a_shared_trunk_equal_separate_runs_bit_for_bit(kind):
    steps = 6
    model, logs, _ = train_heads(kind, steps)
    for k, lam in enumerate(LAMBDAS):
        single, losses = train_single(lam, kind, steps)
        assert [log[f"train/loss_head{k}"] for log in logs] == losses
        head = model.heads[k].state_dict()  # parameters and BatchNorm statistics
        for name, v in single.state_dict().items():
            assert torch.equal(head[name], v), (k, name)
    # the heads did diverge from each other (different lambdas)
    assert not torch.equal(model.heads[0].head.weight, model.heads[2].head.weight)


def test_vmap_loss_falls_back_to_the_loop_for_a_miner_that_draws_at_random():
    model, logs, policy = train_heads("random_miner", 3, vmap_loss=True)
    assert policy._batched is False
    single, losses = train_single(LAMBDAS[1], "random_miner", 3)
    assert [log["train/loss_head1"] for log in logs] == losses


def test_heads_on_a_frozen_trunk_equal_separate_runs_with_that_trunk_frozen():
    steps = 5
    model, logs, _ = train_heads("asms", steps, split="head", freeze=True)
    for k, lam in enumerate(LAMBDAS):
        single, losses = train_single(lam, "asms", steps, freeze=("body.",))
        assert [log[f"train/loss_head{k}"] for log in logs] == losses
        assert torch.equal(model.heads[k].weight, single.head.weight)
        assert torch.equal(model.heads[k].bias, single.head.bias)


@pytest.mark.parametrize("trunk_grad", ["mean", 1])
def test_a_shared_trunk_gets_the_mean_of_the_heads_gradients_or_one_heads(trunk_grad):
    x = batches(1)[0]
    model = ManyHeads(make_mlp(), len(LAMBDAS), split="head", trunk_grad=trunk_grad)
    loss_fn, miner = loss_and_miner("asms")
    out = ManyHeadsThreshold(LAMBDAS, split="head", trunk_grad=trunk_grad).step(model, loss_fn, miner,
                                                                               StepBatch(x, LABELS))
    out.loss.backward()
    grads = []  # each lambda's single-model gradient of the trunk (the same initial weights)
    for k, lam in enumerate(LAMBDAS):
        single = make_mlp()
        loss_fn.threshold = lam
        StaticThreshold().step(single, loss_fn, miner, StepBatch(x, LABELS)).loss.backward()
        grads.append({n: p.grad for n, p in single.named_parameters()})
        torch.testing.assert_close(model.heads[k].weight.grad, single.head.weight.grad, rtol=1e-12, atol=0)
    for name, p in model.trunk.named_parameters():
        want = (sum(g[name] for g in grads) / len(grads)) if trunk_grad == "mean" else grads[trunk_grad][name]
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_name, miner_name", [("soft_contrastive", "asms"), ("soft_contrastive", "at_asms"),
                                                   ("ms", "ms"), ("binomial", "none")])
def test_batched_heads_equal_the_head_by_head_loop(loss_name, miner_name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    loss_fn = instantiate(OmegaConf.load(f"{CONF_DIR}/loss/{loss_name}.yaml"))
    miner = instantiate(OmegaConf.load(f"{CONF_DIR}/miner/{miner_name}.yaml"))
    x = batches(1)[0]
    results = []
    for batched in (True, False):
        model = ManyHeads(make_mlp(), len(LAMBDAS))
        policy = ManyHeadsThreshold(LAMBDAS, vmap_loss=batched)
        out = policy.step(model, loss_fn, miner, StepBatch(x, LABELS))
        out.loss.backward()
        assert policy._batched is (True if batched else None)  # vmap ran (and did not fall back)
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-14)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-10, atol=1e-14)
    for k in b.selection.stats:
        torch.testing.assert_close(a.selection.stats[k].float(), b.selection.stats[k].float())
    assert float(a.loss.detach()) > 0


def test_forward_returns_the_selected_head_and_all_heads_stacked():
    model = ManyHeads(make_mlp(), 3)
    with torch.no_grad():
        model.heads[2].head.weight.mul_(-1.0)  # make head 2 differ
    x = batches(1)[0]
    every = model(x, heads="all")
    assert every.shape == (3, 12, 6)
    torch.testing.assert_close(model(x), every[0])
    model.selected.fill_(2)
    torch.testing.assert_close(model(x), every[2])
    assert "selected" in model.state_dict()


def test_select_head_is_the_first_argmax_and_skips_nan():
    assert select_head([0.2, 0.5, 0.5, 0.1]) == 1
    assert select_head([float("nan"), 0.3, 0.2]) == 1
    assert select_head([0.4]) == 0


def test_compute_meter_counts_k_passes_per_heads_call():
    counts = {}
    for k in (1, 3):
        model = ManyHeads(make_mlp(), k)
        meter = ComputeMeter()
        meter.attach(model)
        model(batches(1)[0], heads="all").sum().backward()
        model(batches(1)[0])  # the selected head alone: one pass
        counts[k] = meter.passes["train"]
    assert counts[3]["forward_images"] - 12 == 3 * (counts[1]["forward_images"] - 12) == 3 * 12
    assert counts[3]["backward_images"] == 3 * counts[1]["backward_images"] == 3 * 12
    assert counts[3]["forward"] == 3 + 1 and counts[3]["backward"] == 3


# ---- successive halving of the heads -----------------------------------------------------------------
def rungs_reference(min_resource: int, eta: int, up_to: int) -> set[int]:
    """The rung validations written out: min_resource, min_resource * eta, min_resource * eta**2, ..."""
    return {min_resource * eta ** i for i in range(up_to) if min_resource * eta ** i <= up_to}


def halving_reference(history: list[list[float]], eta: int, min_resource: int = 1) -> list[list[int]]:
    """The heads trained after each validation: at a rung, sort the survivors by (R@1 descending, index
    ascending), NaN as the worst, and keep the first max(1, n // eta)."""
    alive, out = list(range(len(history[0]))), []
    for v, r1 in enumerate(history, start=1):
        if v in rungs_reference(min_resource, eta, len(history)):
            score = {k: (float("-inf") if math.isnan(r1[k]) else r1[k]) for k in alive}
            ordered = sorted(alive, key=lambda k: (-score[k], k))
            alive = sorted(ordered[:max(1, len(alive) // eta)])
        out.append(list(alive))
    return out


def run_halving(history: list[list[float]], eta: int, min_resource: int = 1) -> list[list[int]]:
    """The policy's own rule (is_rung + halve) over a sequence of per-head validation R@1."""
    active, out = [True] * len(history[0]), []
    for v, r1 in enumerate(history, start=1):
        if is_rung(v, min_resource, eta):
            active = halve(active, r1, eta)
        out.append([k for k, a in enumerate(active) if a])
    return out


def test_rungs_are_min_resource_times_powers_of_eta():
    for min_resource in (1, 2, 3):
        for eta in (2, 3, 4):
            want = rungs_reference(min_resource, eta, 60)
            assert {v for v in range(1, 61) if is_rung(v, min_resource, eta)} == want
    assert not any(is_rung(v, 1, 0) for v in range(1, 20))  # reduction_factor 0: no halving


def test_halving_decisions_on_a_hand_made_sequence():
    # six heads, ten validations; eta 3 -> rungs 1, 3, 9: 6 -> 2 -> 1 heads
    h = [[0.10, 0.30, 0.50, 0.40, 0.20, 0.05],   # rung 1: keep heads 2, 3
         [0.12, 0.32, 0.50, 0.52, 0.99, 0.05],   # head 4 is stopped: its later values never count
         [0.00, 0.00, 0.60, 0.61, 0.99, 0.00],   # rung 3: keep head 3
         *[[0.0, 0.0, 0.9, 0.1, 0.99, 0.0]] * 7]  # head 2 would now be better: too late, it was stopped
    assert run_halving(h, 3) == [[2, 3], [2, 3], [3], *[[3]] * 7] == halving_reference(h, 3)
    # ties go to the lower index; NaN is the worst; eta 2 with min_resource 2 -> rungs 2, 4, 8
    t = [[0.5, 0.5, float("nan"), 0.5]] * 8
    assert run_halving(t, 2, 2) == [[0, 1, 2, 3], [0, 1], [0, 1], [0], [0], [0], [0], [0]] == halving_reference(t, 2, 2)


def test_halving_matches_the_reference_on_random_sequences():
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        k = int(torch.randint(1, 9, (1,), generator=g))
        eta = int(torch.randint(2, 5, (1,), generator=g))
        min_resource = int(torch.randint(1, 4, (1,), generator=g))
        # coarse values make ties common
        h = (torch.randint(0, 4, (12, k), generator=g).double() / 4).tolist()
        if trial % 5 == 0:
            h[0][0] = float("nan")
        assert run_halving(h, eta, min_resource) == halving_reference(h, eta, min_resource), (h, eta, min_resource)


def test_a_stopped_head_stays_put_and_the_survivors_stay_their_grid_runs():
    steps, stop_at = 6, 3
    frozen = {}

    def stop_head_1(i, model):
        if i == stop_at:
            model.active.copy_(torch.tensor([True, False, True]))
            frozen.update({n: v.clone() for n, v in model.heads[1].state_dict().items()})

    model, logs, _ = train_heads("asms", steps, before_step=stop_head_1)
    assert all("train/loss_head1" not in log for log in logs[stop_at:])
    for name, v in model.heads[1].state_dict().items():  # no forward, no gradient, no Adam update
        assert torch.equal(v, frozen[name]), name
    partial, _ = train_single(LAMBDAS[1], "asms", stop_at)  # head 1 = its grid run stopped at the rung
    for name, v in partial.state_dict().items():
        assert torch.equal(model.heads[1].state_dict()[name], v), name
    for k in (0, 2):  # the survivors: bit for bit their whole grid runs
        single, losses = train_single(LAMBDAS[k], "asms", steps)
        assert [log[f"train/loss_head{k}"] for log in logs] == losses
        for name, v in single.state_dict().items():
            assert torch.equal(model.heads[k].state_dict()[name], v), (k, name)


def test_a_shared_trunk_gets_the_mean_over_the_active_heads():
    x = batches(1)[0]
    model = ManyHeads(make_mlp(), len(LAMBDAS), split="head")
    model.active.copy_(torch.tensor([True, False, True]))
    loss_fn, miner = loss_and_miner("asms")
    ManyHeadsThreshold(LAMBDAS, split="head").step(model, loss_fn, miner, StepBatch(x, LABELS)).loss.backward()
    assert model.heads[1].weight.grad is None
    grads = []
    for lam in (LAMBDAS[0], LAMBDAS[2]):
        single = make_mlp()
        loss_fn.threshold = lam
        StaticThreshold().step(single, loss_fn, miner, StepBatch(x, LABELS)).loss.backward()
        grads.append({n: p.grad for n, p in single.named_parameters()})
    for name, p in model.trunk.named_parameters():
        torch.testing.assert_close(p.grad, (grads[0][name] + grads[1][name]) / 2, rtol=1e-9, atol=1e-12)


def test_bad_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="thresholds"):
        ManyHeadsThreshold([])
    with pytest.raises(ConfigError, match="split=head"):
        ManyHeads(make_mlp(), 2, split="none", trunk_grad=0)
    with pytest.raises(ConfigError, match="split=head needs"):
        ManyHeads(torch.nn.Sequential(torch.nn.Linear(10, 6)), 2, split="head")
    assert module_class(ManyHeadsThreshold([0.1])) is ManyHeadsModule and module_class(StaticThreshold()) is DMLModule
    with pytest.raises(ConfigError, match="many_heads"):
        ManyHeadsModule(make_mlp(), SoftContrastiveLoss(), ASMS(), StaticThreshold(), optimizer=torch.optim.Adam)
    with pytest.raises(ConfigError, match="reduction_factor"):
        ManyHeadsThreshold([0.1, 0.2], reduction_factor=1)
    with pytest.raises(ConfigError, match="trunk_grad=mean"):
        ManyHeadsThreshold([0.1, 0.2], split="head", trunk_grad=0, reduction_factor=2)


# ---- DDP: each rank embeds its rows, the heads' embeddings are gathered, every rank computes every head --
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        losses, model = _ddp_trajectory(rank, world)
        torch.save({"losses": losses, "model": model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_trajectory(rank: int, world: int):
    import torch.distributed as dist

    model = ManyHeads(make_mlp(), len(LAMBDAS))
    loss_fn, miner = loss_and_miner("asms")
    policy = ManyHeadsThreshold(LAMBDAS)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    rows = 12 // world
    for x in batches(4):
        out = policy.step(model, loss_fn, miner, StepBatch(x[rank * rows:(rank + 1) * rows], LABELS))
        opt.zero_grad()
        out.loss.backward()
        if world > 1:
            for p in model.parameters():  # DDP's gradient averaging, by hand
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        losses.append(torch.stack([out.logs[f"train/loss_head{k}"] for k in range(len(LAMBDAS))]))
    return losses, model


def test_ddp_ranks_train_the_heads_like_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    losses, model = _ddp_trajectory(0, 1)
    for s, want in enumerate(losses):
        assert torch.equal(ranks[0]["losses"][s], ranks[1]["losses"][s]), f"step {s}: ranks differ"
        torch.testing.assert_close(ranks[0]["losses"][s], want, rtol=1e-10, atol=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]), k
        torch.testing.assert_close(ranks[0]["model"][k], v, rtol=1e-10, atol=1e-12)
    assert not torch.equal(losses[0], losses[-1])


# ---- end to end: the CLI's train(), cached-feature mode --------------------------------------------------
def _train(tmp_path, data_dir, *overrides):
    from ddtas_lightning.runtime.training import train
    from tests.conftest import compose_train
    from tests.data.test_cached_features import TINY_IMAGES

    cfg = compose_train(["experiment=threshold_study", *TINY_IMAGES, "dataset.source.images.source.num_classes=16",
                         "data.batch_size=8", "data.K=2", "data.batches_per_epoch=3", "trainer.max_epochs=2",
                         "metrics.recall_ks=[1,2]", "metrics.nmi=false",
                         "backbone.hidden=[16]", "backbone.dim=8", "seed=3", *overrides], tmp_path, data_dir)
    train(cfg)
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_a_many_heads_run_is_the_grid_and_tests_the_validation_choice(tmp_path, data_dir):
    grid = (-0.2, 0.8)
    heads = _train(tmp_path / "heads", data_dir, "arm=study/many_heads", f"threshold_policy.thresholds=[{grid[0]},{grid[1]}]")
    singles = [_train(tmp_path / f"single{i}", data_dir, "arm=study/static", f"loss.threshold={lam}")
               for i, lam in enumerate(grid)]
    best = heads["val_at_best"]  # one validation, at the end (the study's protocol)
    for k, single in enumerate(singles):  # head k's validation = grid run k's, bit for bit
        assert best[f"val/head{k}/R@1"] == single["val_at_best"]["val/R@1"]
        assert best[f"val/head{k}/MAP@R"] == single["val_at_best"]["val/MAP@R"]
    chosen = int(best["val/selected_head"])
    assert chosen == select_head([best[f"val/head{k}/R@1"] for k in range(2)])
    assert best["val/selected_lambda"] == pytest.approx(grid[chosen])
    # the grid's per-seed pick: the run with the best validation R@1 (first on ties), tested alone
    pick = select_head([s["best_val_R@1"] for s in singles])
    assert heads["best_val_R@1"] == singles[pick]["best_val_R@1"]
    assert {k: v for k, v in heads["test"].items()} == singles[pick]["test"]
    assert heads["final_lambda"] == pytest.approx(grid[pick])  # the run summary's lambda: the tested head's
    # compute: K heads' passes are K runs' passes; the CPU seconds are measured
    train_passes = [r["compute"]["passes"]["train"]["forward_images"] for r in (heads, *singles)]
    assert train_passes[0] == sum(train_passes[1:])
    assert heads["compute"]["fit_cpu_s"] > 0


def test_a_many_heads_run_resumes_exactly(tmp_path, data_dir):
    """4 of 6 steps, then a resume from the step-4 last.ckpt: the end state (every head's weights, the
    selected head, the per-head generators) equals the uninterrupted run's bit for bit."""
    heads = ["arm=study/many_heads", "threshold_policy.thresholds=[0.0,0.6]", "miner=random_hard",
             "loss=triplet", "callbacks.last_checkpoint.every_n_train_steps=1"]
    _train(tmp_path / "full", data_dir, *heads)
    _train(tmp_path / "part", data_dir, *heads, "trainer.max_steps=4")
    ckpt = tmp_path / "part" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    _train(tmp_path / "part", data_dir, *heads, f"ckpt_path={ckpt}")
    a, b = (torch.load(tmp_path / r / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
            for r in ("full", "part"))
    assert a.keys() == b.keys() and "policy.head_rng" in a and "model.selected" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_halving_run_keeps_the_best_head_trains_it_as_its_grid_run_and_counts_only_what_ran(tmp_path, data_dir):
    """Three heads, a validation every epoch (2 epochs x 3 steps), eta 3: at validation 1 the best head goes on
    alone. It must be the head whose grid run had the best validation R@1 after epoch 1, end where that grid
    run ends, and the run's train passes must be 3 heads x 3 steps + 1 head x 3 steps."""
    grid = (-0.2, 0.3, 0.8)
    every_epoch = ["trainer.check_val_every_n_epoch=1", "seed=0"]
    heads = _train(tmp_path / "heads", data_dir, "arm=study/many_heads_sha", f"threshold_policy.thresholds=[{','.join(map(str, grid))}]",
                   "trainer.val_check_interval=null", *every_epoch)
    singles = [_train(tmp_path / f"single{i}", data_dir, "arm=study/static", f"loss.threshold={lam}", *every_epoch)
               for i, lam in enumerate(grid)]
    first = [_val_rows(tmp_path / f"single{i}")[0] for i in range(len(grid))]
    kept = select_head(first)
    assert first.count(max(first)) == 1  # seed 0: a decision, not a tie
    assert any(s_["test"] != singles[kept]["test"] for s_ in singles)  # the test below can tell the heads apart
    assert heads["final_lambda"] == pytest.approx(grid[kept])
    want = singles[kept]
    assert heads["best_val_R@1"] == want["best_val_R@1"] and heads["test"] == want["test"]
    passes = heads["compute"]["passes"]["train"]["forward_images"]
    one = want["compute"]["passes"]["train"]["forward_images"]
    assert passes == one // 2 * len(grid) + one // 2


def _val_rows(run_root) -> list[float]:
    """val/R@1 of every validation of a run, in order (its metrics.csv)."""
    import csv

    text = next((run_root / "run").rglob("metrics.csv")).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    return [float(r["val/R@1"]) for r in rows if r.get("val/R@1")]


# ---- the study report: an arm without a start, with its compute ----------------------------------------
def test_the_study_report_lists_many_heads_as_one_arm_with_its_choice_and_compute(tmp_path):
    import yaml

    from ddtas_lightning.report.study import report, settings
    from tests.test_compare import make_run
    from tests.test_study import GRID, LEARNED, make_setting

    make_setting(tmp_path, "synth_100", GRID, LEARNED)
    chosen = [0.2, 0.2, -0.2]
    for seed, lam in enumerate(chosen):
        run = make_run(tmp_path / "synth_100" / "learned_heads", seed, "study/many_heads", seed, r1=0.15, val=0.3,
                       cpu=12.0, policy="ddtas_lightning.policies.ManyHeadsThreshold", lam=0.0, dataset="synth_100",
                       overrides=["experiment=threshold_study", "arm=study/many_heads", f"seed={seed}"])
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["threshold_policy"]["thresholds"] = list(GRID)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["val_at_best"]["val/selected_lambda"] = lam
        (run / "metrics.json").write_text(json.dumps(metrics))
    s = settings(tmp_path)[0]
    arm = next(a for a in s.comparison.arms if a.label == "many_heads")
    assert arm.kind == "dynamic" and arm.thresholds == "3 heads λ -0.2…0.8, chose λ -0.2 x1, 0.2 x2"
    v = next(v for v in s.comparison.versus if v.arm.label == "many_heads")
    assert v.compute_ratio == pytest.approx(30.0 / 12.0)  # the grid's 3 points x 10 CPU s / one 12-s run
    text = report([s])
    assert "| many_heads | 3 |" in text and "2.5x" in text
