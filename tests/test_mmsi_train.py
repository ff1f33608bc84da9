"""threshold_policy=mmsi / pair_weight through the train entry point: fast_dev_runs, the P_m x 1 meta
batch, the memory restored on resume, and the MMSI recipes (conf/experiment/mmsi_*.yaml, spec
docs/papers/mmsi.md §3, §4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.runtime.builder import build
from ddtas_lightning.runtime.training import train
from tests.conftest import CONF_DIR, TINY_DATA, compose_train

RUN = ["trainer.accelerator=cpu", "trainer.check_val_every_n_epoch=1", "evaluate_before_training=false",
       "test_after_training=false", "logger=none", "data.num_workers=0", "trainer.deterministic=true"]
# TINY_DATA has 4 train classes: a meta batch of 4 classes x 1 (mmsi) / 2 x 2 (pair_weight), and a
# memory that is ready after 2 classes, so that the tiny runs take real updates.
MMSI = ["threshold_policy=mmsi", "data.meta_batch_size=4", "threshold_policy.warmup_classes=2"]
PAIR_WEIGHT = ["threshold_policy=pair_weight", "data.meta_batch_size=4", "data.meta_K=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fast_dev_run(tiny_cfg, *overrides):
    cfg = tiny_cfg("trainer.fast_dev_run=true", "trainer.accelerator=cpu", *overrides)
    r1 = train(cfg)
    return r1, json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())


@pytest.mark.parametrize("overrides", [
    [*MMSI, "threshold_policy.mode=exact"],
    [*MMSI, "threshold_policy.mode=jvp", "loss=contrastive", "threshold_policy.normalization=loss_terms"],
    [*MMSI, "threshold_policy.mode=jvp", "loss=triplet", "miner=batch_hard"],
    [*PAIR_WEIGHT, "threshold_policy.mode=exact", "threshold_policy.normalization=official"],
    [*PAIR_WEIGHT, "threshold_policy.mode=jvp", "loss=binomial"],
], ids=["mmsi-exact", "mmsi-jvp-contrastive", "mmsi-jvp-triplet", "pair_weight-exact-official", "pair_weight-jvp"])
def test_fast_dev_run(tiny_cfg, overrides):
    r1, metrics = fast_dev_run(tiny_cfg, *overrides)
    assert 0.0 <= r1 <= 1.0 and 0.0 <= metrics["test"]["test/R@1"] <= 1.0
    assert metrics["global_steps"] == 1 and metrics["nonfinite_skipped"] == 0  # a real update was taken


def test_mmsi_warm_up_takes_no_optimizer_step(tiny_cfg):
    """Default warm-up (16 classes) on 4 train classes: the memory never gets ready, no update."""
    r1, metrics = fast_dev_run(tiny_cfg, "threshold_policy=mmsi", "data.meta_batch_size=4")
    assert metrics["global_steps"] == 0 and metrics["nonfinite_skipped"] == 0 and 0.0 <= r1 <= 1.0


def test_the_policy_chooses_the_meta_batch_shape(tiny_cfg):
    datamodule, module = build(tiny_cfg(*MMSI, "data.meta_K=2"))
    assert datamodule.meta_K == 1 and datamodule.meta_batch_size == 4  # MMSI: P_m x 1 regardless of data.meta_K
    assert module.policy.memory.warmup_classes == 2
    datamodule, _ = build(tiny_cfg(*PAIR_WEIGHT))
    assert datamodule.meta_K == 2  # pair_weight: data.meta_K


def test_resume_restores_the_memory(tmp_path, data_dir):
    """Stopped after the first epoch (3 steps) of a 3-epoch run and resumed from last.ckpt: weights,
    optimiser-driven state and the MMSI memory equal the uninterrupted run's bit for bit."""

    def cfg(name, *extra):
        return compose_train([*TINY_DATA, *RUN, *MMSI, "threshold_policy.mode=jvp",
                              "threshold_policy.memory_size_per_class=3", "trainer.max_epochs=3",
                              f"paths.output_dir={tmp_path / name}", *extra], tmp_path, data_dir)

    def final_state(name) -> dict:
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    train(cfg("full"))
    train(cfg("part", "trainer.max_steps=3"))
    part = final_state("part")
    train(cfg("part", f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"))
    a, b = final_state("full"), final_state("part")
    assert a.keys() == b.keys() and "policy.memory.embeddings" in a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    # the memory grew and changed after the checkpoint (so the comparison is about the restored state)
    labels = a["policy.memory.labels"]
    assert len(labels) == 4 * 3 and torch.unique(labels).numel() == 4  # 4 classes x 3 slots, full
    assert not torch.equal(part["policy.memory.embeddings"], a["policy.memory.embeddings"])


# ---- the recipes ----------------------------------------------------------------------------------------
COMMON = {
    "backbone.model_name": "bninception", "backbone.dim": 512, "backbone.freeze_bn": True,
    "transform._target_": "ddtas_lightning.data.transforms.BNInceptionTransform", "transform.image_size": 227,
    "optimizer._target_": "torch.optim.Adam", "optimizer.lr": 1e-5, "optimizer.weight_decay": 5e-4,
    "scheduler": {}, "data.batch_size": 80, "data.K": 5, "data.meta_batch_size": 10,
    "data.selection": "test", "data.batches_per_epoch": None,
    "threshold_policy._target_": "ddtas_lightning.policies.MMSI", "threshold_policy.meta_K": 1,
    "threshold_policy.inner_lr": 1e-5,
}
MS = {"loss._target_": "ddtas_lightning.losses.ms.MultiSimilarityLoss", "loss.scale_pos": 2.0,
      "loss.scale_neg": 40.0, "loss.threshold": 0.5,
      "miner._target_": "ddtas_lightning.miners.ms.MultiSimilarityMiner",
      "threshold_policy.normalization": "per_sign"}
# Exported so that tests/test_experiments.py can merge them into its EXPECTED table.
MMSI_EXPECTED = {
    "mmsi_cub200": {**COMMON, **MS, "dataset.name": "cub200", "backbone.pooling": "max", "miner.epsilon": 0.05,
                    "threshold_policy.memory_size_per_class": 100, "threshold_policy.warmup_classes": 98,
                    "trainer.max_epochs": 82, "trainer.check_val_every_n_epoch": 2,
                    "metrics.recall_ks": [1, 2, 4, 8, 16, 32]},
    "mmsi_cars196": {**COMMON, "dataset.name": "cars196", "backbone.pooling": "max",
                     "loss._target_": "ddtas_lightning.losses.contrastive.ContrastiveLoss", "loss.threshold": 0.8,
                     "loss.pos_margin": 1.0, "miner._target_": "ddtas_lightning.miners.none.AllPairsMiner",
                     "threshold_policy.normalization": "loss_terms", "threshold_policy.memory_size_per_class": 1,
                     "threshold_policy.warmup_classes": 98, "trainer.max_epochs": 60,
                     "trainer.check_val_every_n_epoch": 2, "metrics.recall_ks": [1, 2, 4, 8, 16, 32]},
    "mmsi_sop": {**COMMON, **MS, "dataset.name": "sop", "backbone.pooling": "avg+max", "miner.epsilon": 0.03,
                 "threshold_policy.memory_size_per_class": 1000, "threshold_policy.warmup_classes": 1000,
                 "trainer.max_epochs": 8, "trainer.check_val_every_n_epoch": 2,
                 "metrics.recall_ks": [1, 10, 100, 1000]},
}
TRAIN_IMAGES = {"cub200": 5864, "cars196": 8054, "sop": 59551}


def test_every_mmsi_recipe_is_covered():
    # the paper recipes; mmsi_protocol_synthetic (static warm-up then MMSI) is tests/policies/test_mmsi_protocol.py's
    recipes = {p.stem for p in Path(CONF_DIR, "experiment").glob("mmsi_*.yaml")} - {"mmsi_protocol_synthetic"}
    assert recipes == set(MMSI_EXPECTED)


@pytest.mark.parametrize("name", sorted(MMSI_EXPECTED))
def test_mmsi_recipe_resolves_to_the_protocol(name, tmp_path):
    cfg = compose_train([f"experiment={name}"], tmp_path, tmp_path / "data")
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert resolved.task_name == name
    for key, value in MMSI_EXPECTED[name].items():
        got = OmegaConf.select(resolved, key, default="<absent>")
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    for group in ("loss", "miner", "threshold_policy", "transform"):
        instantiate(cfg[group])
    policy = instantiate(cfg.threshold_policy)
    assert policy.meta_K == 1 and policy.inner_lr == cfg.optimizer.lr  # the virtual step uses the model's lr
    steps = cfg.trainer.max_epochs * (TRAIN_IMAGES[cfg.dataset.name] // cfg.data.batch_size)
    assert abs(steps - 6000) <= 60, steps  # ~6,000 iterations, as the DDTAS recipes
    assert cfg.trainer.max_epochs % cfg.trainer.check_val_every_n_epoch == 0  # the last epoch is evaluated
    overridden = compose_train([f"experiment={name}", "optimizer.lr=1e-7"], tmp_path, tmp_path / "data")
    assert overridden.threshold_policy.inner_lr == 1e-7
