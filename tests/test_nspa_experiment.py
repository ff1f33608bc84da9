"""The NSPA recipes (conf/experiment/nspa_*.yaml, spec docs/papers/nspa.md): what they resolve to, the four
strategies of the study (conf/miner/nspa*.yaml) differing only in the policy, a fast_dev_run of the synthetic
experiment with the cluster statistics in metrics.json, and the study summary
(ddtas_lightning.nspa_report)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.miners import NSPAMiner, nspa_probabilities
from ddtas_lightning.report.nspa import heldout_metrics, load_runs, main, summarise
from ddtas_lightning.runtime.training import train
from tests.conftest import CONF_DIR, compose_train
from tests.references import random_batch

STRATEGIES = {
    "nspa_random_hard": (1.0, 0.0, 0.0),
    "nspa_semi_hard": (0.0, 1.0, 0.0),
    "nspa_hardest": (0.0, 0.0, 1.0),
}
CLUSTER_KEYS = (
    "avgCentroidDistance",
    "avgClusterRadius",
    "avgPctOfNegativesInCluster",
    "normClusterRadius",
    "avgPositiveDistance",
    "avgDistanceBetweenElements",
)
# a small gaussian_clusters set for end-to-end runs
SMALL = [
    "dataset.source.points_per_class=40",
    "dataset.source.train_points_per_class=30",
    "data.eval_batch_size=64",
    "trainer.fast_dev_run=true",
    "trainer.accelerator=cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def compose(name: str, tmp_path: Path, *overrides: str):
    return compose_train([f"experiment={name}", *overrides], tmp_path, tmp_path / "data")


def test_synthetic_recipe_resolves_to_the_protocol(tmp_path):
    cfg = compose("nspa_gaussian_clusters", tmp_path)
    r = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert r.dataset.name == "gaussian_clusters" and r.backbone.model_name == "mlp"
    assert (r.dataset.source.num_classes, r.dataset.source.points_per_class, r.dataset.source.dim) == (
        7,
        1100,
        32,
    )
    assert (r.dataset.source.sigma, r.dataset.source.train_classes) == (0.2, 5)
    assert r.backbone.in_dim == 32
    assert r.loss._target_.endswith("TripletMarginLoss") and r.miner._target_.endswith("NSPAMiner")
    assert r.miner.margin == r.loss.threshold == 0.4  # one margin for mining and loss (spec §4)
    assert r.miner.distance == r.loss.distance == "euclidean" and r.loss.squared is False  # spec §5.3
    assert tuple(r.miner.p_init) == (1.0, 0.0, 0.0) and (r.miner.sh_step, r.miner.h_step, r.miner.h_max) == (
        0.1,
        0.01,
        0.5,
    )
    assert (r.data.batch_size, r.data.K) == (14, 7)
    assert r.metrics.cluster_stats is True and r.callbacks.model_checkpoint.monitor is None
    assert r.optimizer._target_ == "torch.optim.RAdam"
    for group in ("loss", "miner", "transform", "backbone", "dataset.source"):
        instantiate(OmegaConf.select(cfg, group))


def test_the_schedule_anneals_within_the_run(tmp_path):
    cfg = compose("nspa_gaussian_clusters", tmp_path)
    miner = instantiate(cfg.miner)
    last = cfg.trainer.max_epochs - 1
    assert miner.probabilities(0) == (1.0, 0.0, 0.0)  # starts as random-hard
    p_h, p_sh, p_hs = miner.probabilities(last)
    assert p_h == 0.0 and p_hs >= 0.45 and p_sh <= 0.55  # phase 3 (almost) reached at the end
    # the phase-1 end point of the spec, (0, 0.9, 0.1) after 10 updates, falls inside the run
    epoch_10 = next(e for e in range(last + 1) if nspa_probabilities(e, cfg.miner.update_every)[0] == 0.0)
    assert miner.probabilities(epoch_10) == pytest.approx((0.0, 0.9, 0.1)) and epoch_10 < last / 2


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_single_policy_strategies_differ_only_in_the_policy(tmp_path, name):
    base = compose("nspa_gaussian_clusters", tmp_path).miner
    cfg = compose("nspa_gaussian_clusters", tmp_path, f"miner={name}")
    differing = {k for k in base if OmegaConf.select(base, k) != OmegaConf.select(cfg.miner, k)}
    assert {"sh_step", "h_step", "h_max"} <= differing <= {"p_init", "sh_step", "h_step", "h_max"}
    miner = instantiate(cfg.miner)
    assert isinstance(miner, NSPAMiner)
    for epoch in (0, 7, 24, 10**4):
        assert miner.probabilities(epoch) == STRATEGIES[name]
    # every triplet of a batch comes from the one policy
    _, labels, sim = random_batch(28, 4, seed=2, clustered=0.7)
    sel = miner(sim, labels, epoch=20, generator=torch.Generator().manual_seed(0))
    policy = STRATEGIES[name].index(1.0)
    for i, key in enumerate(("random_hard", "semi_hard", "hardest")):
        assert int(sel.stats[f"drawn_{key}"]) == (int(sel.stats["candidate_pairs"]) if i == policy else 0)
    assert int(sel.stats["triplets"]) > 0


def test_miner_yamls_stand_alone():
    for name, probs in STRATEGIES.items():
        miner = instantiate(OmegaConf.load(Path(CONF_DIR, "miner", f"{name}.yaml")))
        assert miner.probabilities(123) == probs and miner.margin == 0.4


def test_cub_recipe(tmp_path):
    cfg = compose("nspa_cub200", tmp_path)
    r = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert r.dataset.name == "cub200" and r.backbone.model_name == "bninception"
    assert r.miner._target_.endswith("NSPAMiner") and r.miner.margin == r.loss.threshold == 0.4
    assert abs(r.trainer.max_epochs * (5864 // r.data.batch_size) - 6000) <= 60
    assert instantiate(cfg.miner).probabilities(r.trainer.max_epochs - 1) == (0.0, 0.5, 0.5)
    assert r.metrics.cluster_stats is True
    for group in ("loss", "miner", "transform"):
        instantiate(cfg[group])


@pytest.mark.parametrize("name", ["nspa_gaussian_clusters", "nspa_cub200"])
def test_every_key_has_a_source_comment(name):
    """As tests/test_experiments.py: each value carries a comment naming its source in the spec."""
    lines = Path(CONF_DIR, "experiment", f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    for i, line in enumerate(lines):
        if not re.match(r"^\s*(- override /)?[\w.]+:\s*[^\s#]", line) or line.startswith("task_name:"):
            continue
        block, j = [], i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        assert "spec" in (line.split("#", 1)[1] if "#" in line else "") + " ".join(block), line


def _fast_dev_run(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose("nspa_gaussian_clusters", tmp_path, *SMALL, *overrides)
    train(cfg)
    return json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())


def test_fast_dev_run_reports_the_cluster_statistics(tmp_path):
    metrics = _fast_dev_run(tmp_path)
    assert metrics["global_steps"] == 1 and metrics["nonfinite_skipped"] == 0
    assert metrics["choices"] == {
        "dataset": "gaussian_clusters",
        "backbone": "mlp",
        "loss": "TripletMarginLoss",
        "miner": "NSPAMiner",
        "threshold_policy": "StaticThreshold",
    }
    assert metrics["loss_threshold"] == pytest.approx(0.4)
    for split in ("untrained", "test"):
        m = metrics[split]
        assert 0.0 <= m[f"{split}/R@1"] <= 1.0 and 0.0 <= m[f"{split}/MAP@R"] <= 1.0
        for key in CLUSTER_KEYS:
            assert f"{split}/{key}" in m
        assert 0.0 <= m[f"{split}/avgPctOfNegativesInCluster"] <= 1.0
        assert 0.0 < m[f"{split}/avgCentroidDistance"] <= 2.0  # unit embeddings
    off = _fast_dev_run(tmp_path, "metrics.cluster_stats=false", "miner=nspa_hardest")
    assert not any("avgCentroidDistance" in k for k in off["test"]) and "test/R@1" in off["test"]


def test_report_summarises_mean_and_std_per_strategy(tmp_path, capsys):
    values = {"nspa": [0.9, 0.8], "nspa_hardest": [0.5, 0.7, 0.6]}
    job = 0
    for strategy, r1s in values.items():
        for seed, r1 in enumerate(r1s):
            run = tmp_path / str(job)
            run.mkdir()
            overrides = ["experiment=nspa_gaussian_clusters", f"seed={seed}"]
            overrides += [] if strategy == "nspa" else [f"miner={strategy}"]
            test = {"test/R@1": r1, "test/MAP@R": r1 / 2, "test/avgCentroidDistance": 1.0}
            (run / "metrics.json").write_text(json.dumps({"overrides": overrides, "test": test}))
            job += 1
    summary = summarise(load_runs(tmp_path))
    assert list(summary) == ["nspa_hardest", "nspa"]  # the study's order
    mean, std, n = summary["nspa_hardest"]["R@1"]
    assert (mean, n) == (pytest.approx(0.6), 3) and std == pytest.approx(0.1)
    assert summary["nspa"]["MAP@R"][0] == pytest.approx(0.425)
    assert summary["nspa"]["centroid dist"][1] == 0.0
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| nspa_hardest | 3 | 0.600 ± 0.100 |" in out
    assert main([str(tmp_path / "missing")]) == 1


def test_report_reevaluates_the_tested_checkpoint_on_the_heldout_samples(tmp_path, capsys):
    cfg = compose(
        "nspa_gaussian_clusters",
        tmp_path,
        *SMALL[:3],
        "trainer.max_epochs=1",
        "data.batches_per_epoch=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.accelerator=cpu",
        "evaluate_before_training=false",
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra writes into every run dir
    metrics = json.loads((run / "metrics.json").read_text())
    held = heldout_metrics(run, metrics)
    assert held["heldout/num_queries"] == 5 * 10  # 5 train classes x samples 30-39
    assert 0.0 <= held["heldout/R@1"] <= 1.0 and 0.0 <= held["heldout/avgPctOfNegativesInCluster"] <= 1.0
    assert main([str(run), "--split", "heldout"]) == 0
    assert "| nspa | 1 |" in capsys.readouterr().out
