"""lightning-hydra-template conventions: debug= presets, the printed/saved config tree, run tags, early
stopping, `make help`, and quiet output."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ddtas_lightning.runtime.run_output import LineProgress, config_tree, progress_options
from ddtas_lightning.runtime.training import train
from tests.test_train_cli import REPO

DEBUG = sorted(p.stem for p in Path(REPO, "conf", "debug").glob("*.yaml") if p.stem != "default")


def test_every_debug_preset_composes_to_what_it_promises(tiny_cfg):
    assert DEBUG == ["fdr", "limit", "overfit", "profiler"]
    want = {"fdr": {"fast_dev_run": True}, "overfit": {"overfit_batches": 3},
            "limit": {"limit_train_batches": 3, "limit_val_batches": 2}, "profiler": {"profiler": "simple"}}
    for name in DEBUG:
        cfg = tiny_cfg(f"debug={name}")
        assert cfg.task_name == "debug" and list(cfg.tags) == ["debug"] and cfg.trainer.accelerator == "cpu"
        assert cfg.trainer.detect_anomaly is True and cfg.data.num_workers == 0 and not cfg.logger
        for key, value in want[name].items():
            assert cfg.trainer[key] == value, (name, key)


@pytest.mark.parametrize("preset, steps", [("fdr", 1), ("limit", 9)])
def test_debug_presets_run(tiny_cfg, one_thread, preset, steps):
    cfg = tiny_cfg(f"debug={preset}", "tags=[debug,mine]")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == steps  # fdr: one batch; limit: 3 epochs x 3 batches
    assert metrics["tags"] == ["debug", "mine"]
    tree = (out / "config_tree.yaml").read_text()
    assert tree.startswith("tags:") and "\ndataset:\n" in tree and "${" not in tree.split("\npaths:")[0]


def test_config_tree_puts_groups_first_and_resolves():
    cfg = OmegaConf.create({"seed": 1, "dataset": {"name": "x", "k": "${seed}"}, "tags": ["a"], "loss": {"t": 0.5}})
    tree = config_tree(cfg)
    assert tree.index("tags:") < tree.index("dataset:") < tree.index("loss:") < tree.index("seed:")
    assert "k: 1" in tree


def test_early_stopping_ends_a_run_without_improvement(tiny_cfg, one_thread):
    # min_delta=1: R@1 can never improve by 1, so the run stops after 1 + patience validations
    cfg = tiny_cfg("callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                   "callbacks.early_stopping.min_delta=1.0", "trainer.max_epochs=10", "trainer.accelerator=cpu",
                   "trainer.check_val_every_n_epoch=1", "evaluate_before_training=false")
    train(cfg)
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    steps_per_epoch = 3  # 4 train classes x 6 images / batch 8
    assert metrics["global_steps"] == 2 * steps_per_epoch


def test_progress_is_one_line_per_n_steps_when_not_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    callbacks: list = []
    trainer_cfg = OmegaConf.create({"enable_progress_bar": True})
    assert progress_options(trainer_cfg, callbacks, stream=Tty()) == {} and callbacks == []
    assert progress_options(trainer_cfg, callbacks, stream=io.StringIO()) == {"enable_progress_bar": False}
    assert isinstance(callbacks[0], LineProgress)
    assert progress_options(OmegaConf.create({"enable_progress_bar": False}), [], stream=io.StringIO()) == {}


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    targets = set()
    for line in Path(REPO, "Makefile").read_text().splitlines():
        if line.startswith(".PHONY:"):
            targets |= set(line.split(":", 1)[1].split())
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert targets - {"help"} <= listed, targets - listed
