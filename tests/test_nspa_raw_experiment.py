"""experiment=nspa_gaussian_clusters_raw: the NSPA paper's own setting (docs/papers/nspa.md §1.5): un-normalised
ReLU embeddings, a squared-L2 triplet loss, plain-L2 mining, margin 0.4, everything else as
experiment=nspa_gaussian_clusters. What it resolves to, and a fast_dev_run whose embeddings are raw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ddtas_lightning.runtime.training import train
from tests import test_nspa_experiment as nspa
from tests.test_nspa_experiment import SMALL, compose

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_raw_recipe_is_the_synthetic_recipe_with_the_papers_embeddings(tmp_path):
    raw, unit = compose("nspa_gaussian_clusters_raw", tmp_path), compose("nspa_gaussian_clusters", tmp_path)
    assert raw.backbone.normalize is False and raw.backbone.relu_output is True
    assert raw.loss.squared is True and raw.loss.distance == raw.miner.distance == "euclidean"
    assert raw.loss.threshold == raw.miner.margin == 0.4
    for group in ("dataset", "optimizer", "data", "trainer"):
        assert raw[group] == unit[group], group
    model = instantiate(raw.backbone)
    emb = model(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))
    assert (emb >= 0).all() and not torch.allclose(emb.norm(dim=1), torch.ones(16))  # ReLU, not unit-norm


def test_raw_recipe_trains(tmp_path):
    cfg = compose("nspa_gaussian_clusters_raw", tmp_path, *SMALL)
    train(cfg)
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert metrics["global_steps"] == 1 and metrics["nonfinite_skipped"] == 0
    assert metrics["task_name"] == "nspa_gaussian_clusters_raw"


@pytest.mark.parametrize("name", ["nspa_gaussian_clusters_raw"])
def test_raw_recipe_keys_have_a_source_comment(name):
    nspa.test_every_key_has_a_source_comment(name)
