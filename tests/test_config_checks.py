"""Issue 21's config checks beyond the catalogue rows (tests/test_bad_inputs.py): the boolean keys are derived
from the config files (so every group's booleans are covered and none is missed), evaluate's booleans, the
validation split's class check, and misspelt keys under every kwargs group of the default config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ddtas_lightning.config.checks import boolean_keys, check_booleans, check_known_keys
from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.datamodule import check_eval_split
from ddtas_lightning.data.records import SplitRecords
from tests.conftest import CONF_DIR


def test_boolean_keys_cover_every_group_and_leave_non_booleans_alone():
    keys = boolean_keys()
    for key in ("evaluate_before_training", "test_after_training", "print_config", "metrics.nmi",
                "metrics.cluster_stats", "data.persistent_workers", "inspect.gallery", "inspect.map", "inspect.export",
                "loss.squared", "backbone.pretrained", "transform.hflip", "trainer.enable_progress_bar"):
        assert key in keys, key
    # data.pin_memory is auto|true|false, callbacks/logger values are Lightning's (save_last=link), _partial_ Hydra's
    assert not {"data.pin_memory", "callbacks.model_checkpoint.save_last", "optimizer._partial_"} & keys


@pytest.mark.parametrize("group", ["loss", "miner", "threshold_policy", "optimizer", "scheduler", "dataset", "transform",
                                   "trainer", "backbone", pytest.param("experiment", marks=pytest.mark.slow)])
def test_every_option_of_every_group_passes_the_new_checks(tiny_cfg, group):
    """No shipped config trips them (a boolean key spelt as a string, an option its class does not take)."""
    for path in sorted(Path(CONF_DIR, group).glob("*.yaml")):
        cfg = tiny_cfg(f"{group}={path.stem}", tiny=False)
        check_booleans(cfg)
        check_known_keys(cfg)


@pytest.mark.parametrize("override, message", [
    ("inspect.map=no", "inspect.map must be true or false, got 'no'"),
    ("metrics.nmi=off", "metrics.nmi must be true or false, got 'off'"),
])
def test_evaluate_refuses_loose_booleans_before_loading_anything(tmp_path, override, message):
    from ddtas_lightning.evaluate import evaluate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={tmp_path / 'none.ckpt'}", f"paths.root_dir={tmp_path}",
                                         f"paths.output_dir={tmp_path / 'out'}", override])
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg)


def test_a_validation_split_of_one_class_is_refused_like_a_test_split():
    records = SplitRecords([Path(f"{i}.png") for i in range(4)], [3, 3, 3, 3])
    with pytest.raises(ConfigError, match=r"the validation split \(data.selection=val.*has 1 class with 4 images"):
        check_eval_split(records, "validation split (data.selection=val: the held-out train classes)")
    check_eval_split(SplitRecords([Path(f"{i}.png") for i in range(3)], [1, 1, 2]), "test split")  # 2 classes, one pair
