"""The paper recipes in conf/experiment: each composes with the real configs and resolves to the protocol
of spec docs/papers/ddtas.md §4; ddtas_cub200 runs end to end (fast_dev_run) on a miniature CUB tree, with a
tiny backbone and with the real BN-Inception."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ddtas_lightning.runtime.training import train
from tests.conftest import CONF_DIR, compose_train
from tests.test_mmsi_train import MMSI_EXPECTED

# Recipes whose protocol is checked in their own test file instead of against EXPECTED below.
COVERED_ELSEWHERE = {
    "nspa_gaussian_clusters": "tests/test_nspa_experiment.py",
    "nspa_cub200": "tests/test_nspa_experiment.py",
    "nspa_gaussian_clusters_raw": "tests/test_nspa_raw_experiment.py",
    "threshold_grid": "tests/test_sweep.py",
    "mmsi_protocol_synthetic": "tests/policies/test_mmsi_protocol.py",
    "dinov2_cub200": "tests/models/test_timm_backbones.py",
    "threshold_study": "tests/data/test_cached_features.py",
    "threshold_study_pretrained": "tests/data/test_cached_features.py",
    "stage_tail_lite0": "tests/data/test_cached_activations.py",
}
EXPERIMENTS = sorted(
    p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml") if p.stem not in COVERED_ELSEWHERE
)

# Shared by every recipe (spec §4): BN-Inception 512-d, max+avg pooling, BN frozen, the Caffe-style transform,
# Adam 1e-5 / wd 5e-4 without a schedule, validation on the test split.
COMMON = {
    "backbone.model_name": "bninception",
    "backbone.dim": 512,
    "backbone.pooling": "avg+max",
    "backbone.freeze_bn": True,
    "backbone.checkpoint_path": None,
    "transform._target_": "ddtas_lightning.data.transforms.BNInceptionTransform",
    "transform.image_size": 227,
    "transform.resize": 256,
    "transform.scale": [0.16, 1.0],
    "transform.bgr_255": True,
    "optimizer._target_": "torch.optim.Adam",
    "optimizer.lr": 1e-5,
    "optimizer.weight_decay": 5e-4,
    "scheduler": {},
    "data.selection": "test",
    "data.batches_per_epoch": None,
}
DDTAS = {
    "loss._target_": "ddtas_lightning.losses.soft_contrastive.SoftContrastiveLoss",
    "loss.threshold": 0.7,
    "loss.scale_pos": 2.0,
    "loss.scale_neg": 40.0,
    "miner._target_": "ddtas_lightning.miners.at_asms.AdaptiveToleranceASMS",
    "threshold_policy._target_": "ddtas_lightning.policies.MetaThreshold",
    "threshold_policy.inner_lr": 1e-5,
    "data.meta_batch_size": 10,
    "data.meta_K": 2,
}
CUB_CARS = {"data.batch_size": 80, "data.K": 5, "metrics.recall_ks": [1, 2, 4, 8, 16, 32]}
EXPECTED = {
    "ddtas_cub200": {**COMMON, **DDTAS, **CUB_CARS, "task_name": "ddtas_cub200", "dataset.name": "cub200",
                     "miner.margin": 0.1, "trainer.max_epochs": 82, "trainer.check_val_every_n_epoch": 2},
    "ddtas_cars196": {**COMMON, **DDTAS, **CUB_CARS, "task_name": "ddtas_cars196", "dataset.name": "cars196",
                      "miner.margin": 0.1, "trainer.max_epochs": 60, "trainer.check_val_every_n_epoch": 2},
    "ddtas_sop": {**COMMON, **DDTAS, "task_name": "ddtas_sop", "dataset.name": "sop", "miner.margin": 0.03,
                  "loss.compat_floor_div_bug": False, "data.batch_size": 120, "data.K": 5,
                  "metrics.recall_ks": [1, 10, 100, 1000], "trainer.max_epochs": 12,
                  "trainer.check_val_every_n_epoch": 2},
    "ms_cub200": {**COMMON, **CUB_CARS, "task_name": "ms_cub200", "dataset.name": "cub200",
                  "loss._target_": "ddtas_lightning.losses.ms.MultiSimilarityLoss", "loss.threshold": 0.5,
                  "loss.scale_pos": 2.0, "loss.scale_neg": 40.0,
                  "miner._target_": "ddtas_lightning.miners.ms.MultiSimilarityMiner", "miner.epsilon": 0.1,
                  "threshold_policy._target_": "ddtas_lightning.policies.StaticThreshold",
                  "threshold_policy.threshold": None, "trainer.max_epochs": 82,
                  "trainer.check_val_every_n_epoch": 2},
}
EXPECTED.update(MMSI_EXPECTED)  # the MMSI recipes' protocol lives beside their own tests
# Train images of the standard splits (spec §4 Splits): an epoch is one pass, len // batch_size batches.
TRAIN_IMAGES = {"cub200": 5864, "cars196": 8054, "sop": 59551}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def compose(name: str, tmp_path: Path, *overrides: str):
    return compose_train([f"experiment={name}", *overrides], tmp_path, tmp_path / "data")


def test_every_experiment_has_expectations():
    assert set(EXPERIMENTS) == set(EXPECTED)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_resolves_to_the_protocol(name, tmp_path):
    cfg = compose(name, tmp_path)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in EXPECTED[name].items():
        got = OmegaConf.select(resolved, key, default="<absent>")
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    # the objects the recipe names are constructible (no data, no backbone needed)
    for group in ("loss", "miner", "threshold_policy", "transform"):
        instantiate(cfg[group])
    instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if not n.startswith("ddtas_sop")])
def test_cub_cars_recipes_run_about_6000_iterations(name, tmp_path):
    cfg = compose(name, tmp_path)
    steps = cfg.trainer.max_epochs * (TRAIN_IMAGES[cfg.dataset.name] // cfg.data.batch_size)
    assert abs(steps - 6000) <= 60, steps  # spec §4: 1000 code epochs x 6 iterations
    assert cfg.trainer.max_epochs % cfg.trainer.check_val_every_n_epoch == 0  # the last epoch is evaluated


def test_recipes_can_be_overridden_from_the_command_line(tmp_path):
    cfg = compose("ddtas_sop", tmp_path, "optimizer.lr=1e-7", "backbone.checkpoint_path=/w/ms_sop.pth")
    assert cfg.optimizer.lr == 1e-7 and cfg.threshold_policy.inner_lr == 1e-7
    assert cfg.backbone.checkpoint_path == "/w/ms_sop.pth"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_key_the_recipe_sets_has_a_source_comment(name):
    """Each value (and each group override) carries a comment, inline or in the comment block right above,
    that names its source in the spec."""
    text = Path(CONF_DIR, "experiment", f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"^\s*(- override /)?[\w.]+:\s*[^\s#]", line) or line.startswith("task_name:"):
            continue
        block = []
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        comment = (line.split("#", 1)[1] if "#" in line else "") + " ".join(block)
        assert "spec" in comment, f"{name}.yaml: no source comment for {line.strip()!r}"


# ---- end-to-end runs on a miniature CUB tree -------------------------------------------------------------

def make_cub_tree(parent: Path, num_classes: int = 8, per_class: int = 4) -> Path:
    """The CUB_200_2011 folder of a miniature tree in the genuine layout (tiny real JPEGs)."""
    root = parent / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, classes = [], [], []
    k = 0
    for c in range(1, num_classes + 1):
        cname = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {cname}")
        for j in range(per_class):
            k += 1
            rel = f"{cname}/Bird_{c}_{j:04d}.jpg"
            (root / "images" / cname).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(root / "images" / rel)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# 8 classes: 4 train (P = 4 of K = 2), 4 test; meta batch 2 classes x 2.
MINI = [
    "data.batch_size=8", "data.K=2", "data.meta_batch_size=4", "data.meta_K=2", "data.num_workers=0",
    "data.eval_batch_size=64", "dataset.recall_ks=[1,2]", "trainer.fast_dev_run=true", "trainer.accelerator=cpu",
]


def fast_dev_run(tmp_path: Path, *overrides: str) -> dict:
    root = make_cub_tree(tmp_path)
    cfg = compose("ddtas_cub200", tmp_path, f"dataset.source.root={root}", *MINI, *overrides)
    r1 = train(cfg)
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert 0.0 <= r1 <= 1.0
    assert metrics["global_steps"] == 1 and metrics["nonfinite_skipped"] == 0
    assert metrics["task_name"] == "ddtas_cub200"
    assert metrics["choices"] | {"backbone": None} == {
        "dataset": "cub200", "backbone": None, "loss": "SoftContrastiveLoss",
        "miner": "AdaptiveToleranceASMS", "threshold_policy": "MetaThreshold",
    }
    assert metrics["loss_threshold"] == pytest.approx(0.7)
    assert 0.0 <= metrics["test"]["test/R@1"] <= 1.0 and 0.0 <= metrics["untrained"]["untrained/R@2"] <= 1.0
    return metrics


def test_ddtas_cub200_fast_dev_run_with_a_tiny_backbone(tmp_path):
    metrics = fast_dev_run(tmp_path, "backbone.model_name=resnet10t", "backbone.dim=16",
                           "dataset.image_size=32", "transform.resize=36")
    assert metrics["choices"]["backbone"] == "resnet10t"


@pytest.mark.parametrize("mode", ["exact", "jvp"])  # jvp: forward-mode AD through the in-place ReLUs
def test_ddtas_cub200_fast_dev_run_with_bn_inception(tmp_path, mode):
    started = time.perf_counter()
    metrics = fast_dev_run(tmp_path, "dataset.image_size=96", "transform.resize=110", f"threshold_policy.mode={mode}")
    assert metrics["choices"]["backbone"] == "bninception"
    assert time.perf_counter() - started < 120
