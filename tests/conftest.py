"""Shared fixtures: compose the real Hydra configs (as a user would) with overrides that keep runs tiny."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "disabled")
# Converted packaged weights (models/pretrained.py) go to a per-session folder, not the user's ~/.cache.
os.environ.setdefault("DDTAS_WEIGHTS_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ddtas-weights-{os.getpid()}"))

# A synthetic set small enough for a fast_dev_run in seconds: 6 train classes, of which the default
# protocol (data.selection=val, val_fraction 0.25) holds 2 out for validation, so 4 train; 6 test classes.
TINY_DATA = [
    "dataset.source.num_classes=12",
    "dataset.source.images_per_class=6",
    "dataset.image_size=32",
    "data.batch_size=8",
    "data.K=2",
    "data.num_workers=0",
    "data.eval_batch_size=64",
    "backbone.model_name=resnet10t",
    "backbone.dim=16",
    "metrics.recall_ks=[1,2]",
]


def compose_train(overrides: list[str], tmp_path: Path, data_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.data_dir={data_dir}",
                *overrides,
            ],
        )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data dir for the whole session, so the synthetic set is materialised once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_cfg(tmp_path, data_dir):
    def make(*overrides: str, tiny: bool = True):
        return compose_train([*(TINY_DATA if tiny else []), *overrides], tmp_path, data_dir)

    return make


@pytest.fixture
def one_thread():
    """One torch thread for the test (the 2-core CI machine runs tiny models: threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A free TCP port on the loopback (the rendezvous of the tests' gloo process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
