"""DDP equivalence: 2 processes x (B/2) train exactly like 1 process x B (issue 8).

The framework's DDP semantics (:mod:`ddtas_lightning.runtime.distributed`): every rank embeds its share of the
global P x K batch, the embeddings are gathered with gradient, every rank computes the loss (mining,
learned threshold, meta gradient, pair weights) of the whole global batch, and DDP's averaging of
the parameter gradients gives the single-process gradient. If that holds, the two set-ups follow the
same trajectory, which this test checks end to end.

Design. Both set-ups run the real CLI, ``python -m ddtas_lightning.train``, as a subprocess: one
with ``trainer.devices=1``, one with ``trainer=ddp trainer.devices=2 trainer.accelerator=cpu``
(Lightning's own DDP launcher re-runs the Hydra app for rank 1, gloo on CPU). That exercises exactly
what a user runs: conf/trainer/ddp.yaml, the launcher, ``prepare_data`` on rank 0 only, the rank-aware
P x K sampler and the evaluation shards. (``ddp_spawn`` from inside pytest would test a strategy no
config uses and re-imports everything in the spawned children anyway, so it is no faster.)

Everything that could legitimately differ between 1 x B and 2 x B/2 is the same by construction:

* BatchNorm: ``backbone.freeze_bn=true`` (the papers' setting and the framework's recommendation for
  DDP, see conf/trainer/ddp.yaml): every pass normalises with the running statistics, so an image's
  embedding does not depend on which other images share its forward. (BN in train mode would use
  per-rank batch statistics; ``trainer.sync_batchnorm=true`` would fix the real forward, but
  SyncBatchNorm is GPU-only, so it cannot be tested here.)
* augmentation: ``transform=simple`` made deterministic (crop scale and aspect ratio 1 on the square
  synthetic images: the whole image; no flip). Random augmentations are drawn from one seed per
  rank's share of a batch (``data/batch_rng.py``: seed, epoch, batch index, rank), so the same image
  gets different crops in the two set-ups (statistically equivalent, not identical). The test
  records a per-image fingerprint of what each rank loaded, so it would also catch that.
* miner / sampler: rank r gets the r-th contiguous block of P/W classes of every global batch, so the
  gathered batch is the single-process batch in the same order and the miner's generator (seeded
  alike on every rank) makes the same draws. The MS miner used here is deterministic anyway.

Precision: float64 (``trainer.precision=64-true``), so the comparison can be tight. The two set-ups
differ only in the order of floating-point reductions (the all-reduce of the virtual step and DDP's
gradient averaging sum W partial gradients that one process gets from a single backward), i.e. by a
few ulps per step; observed differences are ~1e-15. The tolerances (relative 1e-9 on losses, lambda
and weights after a few Adam steps) leave six orders of magnitude for that and are still far below
what any plumbing error produces (a missing or double average is a factor 2; a per-rank loss or
meta batch changes the loss in the first or second digit). One exception, explained at
``POS_NEG_RTOL``: the (lambda_pos, lambda_neg) variant, where an almost-zero meta gradient meets
Adam's eps.

Checked for each policy: the per-step train loss logged by the CSV logger, every rank's own loss and
policy state (lambda / Adam moments / MMSI memory) after every step (ranks must agree *exactly*; DDP
broadcasts buffers from rank 0 before each forward, which would hide a divergence, so the state is
recorded right after the step by :class:`RankStateDump`), the final weights of every rank and of
``last.ckpt``, the dataset indices each rank trained on, and the evaluation: the 49-image test set
(odd, so rank 1's shard is padded with a repeat) must give the same retrieval metrics and count 49
queries, i.e. the padded duplicate was removed by dataset index after the gather.

The static policy is the fast check of the default suite (~25 s on an idle 2-core machine: three
Python processes start); the meta-learning policies run the same comparison under ``slow``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# 14 synthetic classes: 7 train classes x 7 images, of which 2 are held out for validation (data.selection=val:
# a 14-image validation set) and 5 train, and a 49-image (odd) test set. P x K = 4 x 2, so each
# of the 2 ranks gets 2 classes x 2 images per step; 4 steps in one epoch, then validation and test.
TINY = [
    "dataset.source.num_classes=14",
    "dataset.source.images_per_class=7",
    "dataset.image_size=32",
    "data.batch_size=8",
    "data.K=2",
    "data.batches_per_epoch=4",
    "data.num_workers=0",
    "transform=simple",
    "transform.scale=[1.0,1.0]",
    "++transform.ratio=[1.0,1.0]",
    "transform.hflip=false",
    "data.eval_batch_size=16",  # several eval batches per rank
    "backbone.model_name=resnet10t",
    "backbone.dim=16",
    "backbone.freeze_bn=true",
    "metrics.recall_ks=[1,2]",
    "scheduler=none",
    "trainer.accelerator=cpu",
    "trainer.precision=64-true",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "evaluate_before_training=true",
    "test_after_training=true",
]
TEST_SET_SIZE = 49  # odd: rank 1's shard is padded with a repeat
VAL_SET_SIZE = 14
RTOL, ATOL = 1e-9, 1e-12  # float64 runs; see the module docstring
# The module logs lambda (like every policy log) as float32: its logged value is compared at float32's
# resolution (the float64 lambda in the policy state is compared at RTOL).
LOGGED_FLOAT32_RTOL = 2e-7
# pos_neg: with the tiny synthetic set, lambda_neg's meta gradient is ~1e-9, the remainder of a sum of
# terms ~1e-1 that nearly cancel, so float64 rounding leaves it ~5e-8 relative; and since
# |g / inner_lr| ~ 1.6e-8 is of the order of Adam's eps (1e-8), the first Adam step of lambda_neg is
# in the regime where the step is proportional to g, not to sign(g): the run-to-run difference of
# lambda_neg is ~1e-9 relative (observed 1.2e-9). 1e-6 still separates this from any plumbing error
# (O(1) relative differences; a factor 2 in the meta gradient shows in Adam's moments).
POS_NEG_RTOL = 1e-6

# Meta batch for the meta-learning policies: 2 classes x 2 images (meta) / 4 classes x 1 (MMSI).
META = [
    "data.meta_batch_size=4",
    "data.meta_K=2",
    "threshold_policy.min=0.1",
    "threshold_policy.max=0.9",
    "threshold_policy.inner_lr=0.1",
    "threshold_policy.lr=0.05",
]
MMSI_MISSING = pytest.mark.skipif(
    not (REPO / "conf" / "threshold_policy" / "mmsi.yaml").is_file(),
    reason="conf/threshold_policy/mmsi.yaml does not exist (the MMSI policy is not merged yet)",
)
# MMSI: step 0 fills the memory with 4 of the 5 train classes (warm-up: skip_update path), later steps
# update. mode=exact (double backward) is single-process only; jvp gives the same weights (spec §1.1).
MMSI = [
    "threshold_policy=mmsi",
    "threshold_policy.mode=jvp",
    "threshold_policy.warmup_classes=5",
    "threshold_policy.inner_lr=0.1",
    "data.meta_batch_size=4",
]

POLICIES = [
    pytest.param(["threshold_policy=static", "loss.threshold=0.5"], RTOL, id="static"),
    # a miner that draws at random (its generator is seeded alike everywhere): the draws agree only
    # because the gathered batch has the single-process order
    pytest.param(
        ["threshold_policy=static", "loss=triplet", "miner=random_hard"],
        RTOL,
        id="static-random-miner",
        marks=pytest.mark.slow,
    ),
    # scalar lambda: the exact identity's reverse-mode (cotangent) form, through the gathered rows
    pytest.param(
        [
            "threshold_policy=meta",
            "threshold_policy.mode=exact",
            "threshold_policy.exact_impl=identity",
            *META,
        ],
        RTOL,
        id="meta-exact-identity",
        marks=pytest.mark.slow,
    ),
    # (lambda_pos, lambda_neg): the exact identity's forward-mode form (gathered tangents)
    pytest.param(
        [
            "threshold_policy=meta",
            "threshold_policy.mode=exact",
            "threshold_policy.granularity=pos_neg",
            *META,
        ],
        POS_NEG_RTOL,
        id="meta-exact-pos_neg",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        ["threshold_policy=meta", "threshold_policy.mode=jvp", *META],
        RTOL,
        id="meta-jvp",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        MMSI,
        RTOL,
        id="mmsi-jvp",
        marks=[pytest.mark.slow, MMSI_MISSING],
    ),
    # lambda from the global batch's negative-pair quantile (issue 23): every rank sorts the same gathered S
    pytest.param(
        ["threshold_policy=target_rate", "loss=soft_contrastive", "miner=asms", "loss.threshold=0.5"],
        RTOL,
        id="target_rate",
        marks=pytest.mark.slow,
    ),
]


class RankStateDump(pl.Callback):
    """Saves ``<dirpath>/rank<r>.pt`` at the end of fit: per step, the rank's loss, the dataset indices
    it loaded and the policy's state right after the step; at the end, the model's weights (and the
    head's initial weights, to see that the run trained).

    Used by the CLI runs through ``+callbacks.rank_dump._target_=tests.test_ddp_equivalence.RankStateDump``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial_head = pl_module.model.head.weight.detach().cpu().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(
            {
                "loss": float(loss),
                "indices": batch[2].detach().cpu().clone(),
                "image_sums": batch[0].detach().cpu().double().flatten(1).sum(1),  # augmentation fingerprint
                "policy": {k: v.detach().cpu().clone() for k, v in pl_module.policy.state_dict().items()},
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        model = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(
            {"steps": self.steps, "model": model, "initial_head": self.initial_head},
            self.dirpath / f"rank{trainer.global_rank}.pt",
        )


@dataclass
class Run:
    dir: Path
    world: int

    def rank(self, r: int) -> dict:
        return torch.load(self.dir / "rank_dump" / f"rank{r}.pt", weights_only=False)

    def logged(self, key: str) -> list[float]:
        """``key`` per training step from the CSV logger (rank 0 writes it)."""
        rows = csv.DictReader((self.dir / "csv" / "metrics.csv").open())
        return [float(row[key]) for row in rows if row.get(key)]

    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics.json").read_text())

    def last_ckpt_model(self) -> dict:
        state = torch.load(self.dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
        return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def train_cli(tmp: Path, devices: int, overrides: list[str]) -> Run:
    run_dir = tmp / f"devices{devices}"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)  # let Lightning pick a free port
    trainer = ["trainer=ddp", "trainer.devices=2"] if devices == 2 else ["trainer.devices=1"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddtas_lightning.train",
            f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp / 'data'}",
            *TINY,
            *trainer,
            *overrides,
            "+callbacks.rank_dump._target_=tests.test_ddp_equivalence.RankStateDump",
            f"+callbacks.rank_dump.dirpath={run_dir / 'rank_dump'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=400,
    )
    assert proc.returncode == 0, f"devices={devices} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return Run(run_dir, devices)


def assert_close(actual, expected, what: str, rtol: float) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=ATOL,
        msg=what,
    )


def assert_states_close(actual: dict, expected: dict, what: str, rtol: float) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        if expected[k].is_floating_point():
            torch.testing.assert_close(
                actual[k], expected[k], rtol=rtol, atol=ATOL, msg=lambda m, k=k: f"{what} {k}: {m}"
            )
        else:
            assert torch.equal(actual[k], expected[k]), f"{what} {k}"


def assert_states_equal(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        assert torch.equal(actual[k], expected[k]), f"{what} {k}: {actual[k]} != {expected[k]}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("policy, rtol", POLICIES)
def test_two_ranks_train_like_one_process(tmp_path, policy, rtol):
    single = train_cli(tmp_path, 1, policy)  # first: it also materialises the synthetic data set
    ddp = train_cli(tmp_path, 2, policy)
    one, ranks = single.rank(0), [ddp.rank(r) for r in range(2)]
    n_steps = len(one["steps"])
    assert n_steps == 4 and all(len(r["steps"]) == n_steps for r in ranks)

    for s in range(n_steps):
        # The ranks' shares, concatenated in rank order, are the single-process batch (same order).
        assert torch.equal(
            torch.cat([r["steps"][s]["indices"][:4] for r in ranks]), one["steps"][s]["indices"][:8]
        )
        # ... loaded and transformed alike (a fingerprint per image), meta batch included.
        for r, (start, stop) in enumerate(((0, 4), (4, 8))):
            assert torch.equal(
                ranks[r]["steps"][s]["image_sums"][:4], one["steps"][s]["image_sums"][start:stop]
            ), f"step {s}: rank {r}'s images differ from the single process's"
            assert torch.equal(ranks[r]["steps"][s]["image_sums"][4:], one["steps"][s]["image_sums"][8:]), (
                f"step {s}: rank {r}'s meta batch differs from the single process's"
            )
        # Every rank computes the loss of the global batch and ends the step with the same policy state
        # (lambda and its Adam moments / MMSI's memory), bit for bit.
        assert ranks[0]["steps"][s]["loss"] == ranks[1]["steps"][s]["loss"], f"step {s}: ranks' losses differ"
        assert_states_equal(
            ranks[1]["steps"][s]["policy"], ranks[0]["steps"][s]["policy"], f"step {s}: rank 1 policy"
        )
        # ... and they equal the single process's.
        assert_close(ranks[0]["steps"][s]["loss"], one["steps"][s]["loss"], f"step {s}: loss", rtol)
        assert_states_close(
            ranks[0]["steps"][s]["policy"], one["steps"][s]["policy"], f"step {s}: policy", rtol
        )

    # The logged trajectory (rank 0's logger) and the learned lambda.
    assert_close(ddp.logged("train/loss"), single.logged("train/loss"), "logged train/loss", rtol)
    for key in ("train/lambda", "train/lambda_pos", "train/lambda_neg"):
        if single.logged(key) or ddp.logged(key):
            assert_close(ddp.logged(key), single.logged(key), f"logged {key}", max(rtol, LOGGED_FLOAT32_RTOL))
    # Weights: identical on the two ranks, equal to the single process's, also as written to last.ckpt.
    assert_states_equal(ranks[1]["model"], ranks[0]["model"], "rank 1 weights")
    assert_states_close(ranks[0]["model"], one["model"], "weights", rtol)
    assert_states_close(ddp.last_ckpt_model(), single.last_ckpt_model(), "last.ckpt weights", rtol)
    assert not torch.equal(one["model"]["head.weight"], one["initial_head"]), "the run did not train"
    if "lam" in one["steps"][0]["policy"]:  # the meta policy: lambda did learn
        assert not torch.equal(one["steps"][0]["policy"]["lam"], one["steps"][-1]["policy"]["lam"])
    if single.logged("meta/warmup"):  # MMSI: both the warm-up (skip_update) path and real updates ran
        assert set(single.logged("meta/warmup")) == set(ddp.logged("meta/warmup")) == {0.0, 1.0}

    # Evaluation: embeddings gathered over the ranks, rank 1's padded repeat removed by dataset index.
    m1, m2 = single.metrics(), ddp.metrics()
    for split in ("untrained", "val", "test"):
        size = VAL_SET_SIZE if split == "val" else TEST_SET_SIZE
        assert m1[split][f"{split}/num_queries"] == m2[split][f"{split}/num_queries"] == size
        assert m2[split] == pytest.approx(m1[split], rel=1e-6, abs=1e-6), split


def test_freeze_bn_holds_without_a_train_call():
    """Lightning (>= 2.2) never calls ``.train()`` when fitting starts, so ``freeze_bn`` must hold from
    construction on; otherwise BN runs in train mode with per-rank batch statistics (and the DDP
    equivalence above fails at the first step)."""
    from ddtas_lightning.models.embedder import Embedder

    bns = [
        m
        for m in Embedder("resnet10t", dim=8, freeze_bn=True).modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert bns and not any(m.training for m in bns)
