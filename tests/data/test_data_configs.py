"""conf/dataset/*.yaml and conf/transform/*.yaml instantiate to the objects they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ddtas_lightning.data import CUB200, SOP, Cars196, Folder, InShop, Synthetic, TransformPair

CONF = Path(__file__).resolve().parents[2] / "conf"
DATASETS = {"synthetic": Synthetic, "cub200": CUB200, "cars196": Cars196, "sop": SOP, "inshop": InShop,
            "folder": Folder}
RECALL_KS = {"sop": [1, 10, 100, 1000], "inshop": [1, 10, 20, 30, 40, 50]}


def compose(data_dir, dataset="synthetic", transform=None, model_name="resnet18"):
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "backbone": {"model_name": model_name}})
    cfg.dataset = OmegaConf.load(CONF / "dataset" / f"{dataset}.yaml")
    if transform:
        cfg.transform = OmegaConf.load(CONF / "transform" / f"{transform}.yaml")
    return cfg


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_configs(tmp_path, name):
    cfg = compose(tmp_path, name)
    assert set(cfg.dataset) == {"name", "source", "recall_ks", "image_size", "default_transform"}
    assert cfg.dataset.name == name
    assert list(cfg.dataset.recall_ks) == RECALL_KS.get(name, [1, 2, 4, 8, 16, 32])
    assert (CONF / "transform" / f"{cfg.dataset.default_transform}.yaml").is_file()
    source = instantiate(cfg.dataset.source)  # constructing reads nothing; load() does
    assert type(source) is DATASETS[name]
    assert str(source.root).startswith(str(tmp_path))
    assert cfg.dataset.image_size == (64 if name == "synthetic" else 227)


def test_synthetic_config_loads(tmp_path):
    cfg = compose(tmp_path, "synthetic")
    cfg.dataset.source.num_classes = 4
    cfg.dataset.source.images_per_class = 2
    cfg.dataset.image_size = 16  # the source follows dataset.image_size
    source = instantiate(cfg.dataset.source)
    tr = source.load("train")
    assert (len(tr), tr.num_classes) == (4, 2)
    assert (tmp_path / "synthetic" / "CUB_200_2011" / "images.txt").is_file()
    with Image.open(tr.paths[0]) as im:
        assert im.size == (16, 16)


@pytest.mark.parametrize("name,size", [("simple", 64), ("bninception", 227), ("imagenet", 227), ("timm", 224)])
def test_transform_configs(tmp_path, name, size):
    cfg = compose(tmp_path, "cub200" if size == 227 else "synthetic", transform=name)
    t = instantiate(cfg.transform)
    assert isinstance(t, TransformPair)
    image = Image.new("RGB", (300, 280), (200, 100, 50))
    for fn in (t.train, t.test):
        x = fn(image)
        assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_transform_configs_without_dataset(tmp_path):
    """Each transform config also composes on its own (sizes fall back to their defaults)."""
    for name, size in [("simple", 64), ("bninception", 227), ("imagenet", 227)]:
        t = instantiate(OmegaConf.load(CONF / "transform" / f"{name}.yaml"))
        assert t.test(Image.new("RGB", (300, 300))).shape == (3, size, size)
