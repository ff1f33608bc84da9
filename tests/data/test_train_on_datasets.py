"""A fast_dev_run of the real train entry point on a miniature tree of every dataset layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddtas_lightning.runtime.training import train
from tests.conftest import compose_train

SMALL = [
    "transform=simple", "dataset.image_size=32", "data.batch_size=4", "data.K=2", "data.num_workers=0",
    "backbone.model_name=resnet10t", "backbone.dim=16", "dataset.recall_ks=[1,2]",
    "trainer.fast_dev_run=true", "trainer.accelerator=cpu",
    "data.selection=test",  # the tiny trees have 2 train classes: nothing to hold out (the layouts are tested here)
]


def folder_tree(root: Path, helpers) -> Path:
    for c in range(4):
        for j in range(3):
            helpers.write_image(root / f"class_{c}" / f"{j}.png", seed=10 * c + j)
    return root


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "inshop", "folder"])
def test_fast_dev_run_on_each_dataset_layout(name, tmp_path, data_dir, helpers, cub_tree, cars_tree,
                                             sop_tree, inshop_tree):
    root = {
        "cub200": lambda: cub_tree(),
        "cars196": lambda: cars_tree(),
        "sop": lambda: sop_tree(n_train=3, n_test=3),
        "inshop": lambda: inshop_tree(),
        "folder": lambda: folder_tree(tmp_path / "folder", helpers),
    }[name]()
    cfg = compose_train([f"dataset={name}", f"dataset.source.root={root}", *SMALL], tmp_path, data_dir)
    r1 = train(cfg)
    assert 0.0 <= r1 <= 1.0
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert metrics["choices"]["dataset"] == name
    assert metrics["test"]["test/num_queries"] > 0
