"""dataset=gaussian_clusters: NSPA's synthetic vectors (spec docs/papers/nspa.md §2.1), generated in memory,
through the config, the data module and the P x K sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ddtas_lightning.data.datamodule import DMLDataModule
from ddtas_lightning.data.gaussian_clusters import (
    GaussianClusters,
    IdentityTransform,
    VectorDataset,
    gaussian_clusters,
)

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_generator_follows_the_spec():
    a = gaussian_clusters(seed=3)
    assert a.shape == (7, 1100, 32) and a.dtype == np.float32
    # replay the draws: centres ~ U[0,1]^32 first, then x = c - 0.2 eps class by class
    rng = np.random.default_rng(3)
    centres = rng.random((7, 32))
    assert np.allclose(a[0], centres[0] - 0.2 * rng.standard_normal((1100, 32)), atol=1e-6)
    means, stds = a.mean(1), (a - centres[:, None]).std(axis=(1, 2))
    assert np.abs(means - centres).max() < 0.03  # 0.2 / sqrt(1100) = 0.006 per coordinate
    assert np.allclose(stds, 0.2, atol=0.005)
    assert np.array_equal(a, gaussian_clusters(seed=3)) and not np.array_equal(a, gaussian_clusters(seed=4))


def test_splits_sizes_and_disjointness():
    src = GaussianClusters()
    train, val, test = src.load("train"), src.load("val"), src.load("test")
    assert (len(train), train.num_classes) == (5000, 5)
    assert (len(val), val.num_classes) == (500, 5)
    assert (len(test), test.num_classes) == (2200, 2)
    assert set(train.labels) == set(val.labels) == {0, 1, 2, 3, 4} and set(test.labels) == {5, 6}
    assert not set(train.paths) & set(val.paths)
    heldout = GaussianClusters(test_split="heldout").load("test")
    assert heldout.paths == val.paths and heldout.labels == val.labels
    with pytest.raises(ValueError):
        src.load("extra")


def test_dataset_items_are_the_generated_vectors():
    src = GaussianClusters(seed=1)
    records = src.load("test")
    ds = src.make_dataset(records, IdentityTransform().test)
    assert isinstance(ds, VectorDataset) and len(ds) == 2200
    x, label, i = ds[1100 + 7]
    assert (label, i) == (6, 1107) and x.shape == (32,) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(gaussian_clusters(seed=1)[6, 7]))
    assert ds.labels.dtype == torch.long and ds.is_query.all() and ds.is_gallery.all()
    # any subset of the records maps back to its own vectors
    sub = type(records)(records.paths[5:9], records.labels[5:9])
    assert torch.equal(src.make_dataset(sub).vectors, ds.vectors[5:9])


def test_identity_transform_passes_vectors_and_converts_images():
    t = IdentityTransform()
    v = torch.randn(32)
    assert t.train(v) is v and t.test(v) is v
    img = t.test(Image.new("RGB", (5, 4), (255, 0, 0)))
    assert img.shape == (3, 4, 5) and img[0].eq(1).all() and img[1:].eq(0).all()


def test_config_and_data_module_give_p_by_k_vector_batches():
    cfg = OmegaConf.create({"dataset": OmegaConf.load(CONF / "dataset" / "gaussian_clusters.yaml")})
    assert cfg.dataset.default_transform == "none" and cfg.dataset.image_size is None
    assert (CONF / "transform" / "none.yaml").is_file()
    source = instantiate(cfg.dataset.source)
    assert isinstance(source, GaussianClusters) and (source.dim, source.sigma, source.seed) == (32, 0.2, 0)
    transform = instantiate(OmegaConf.load(CONF / "transform" / "none.yaml"))
    dm = DMLDataModule(source, transform, batch_size=14, K=7, batches_per_epoch=3, eval_batch_size=1100,
                       selection="test")  # the recipe's setting: 5 train classes, the 2 test classes validate
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (14, 32) and len(set(y.tolist())) == 2 and torch.bincount(y).max() == 7
    assert torch.equal(x, dm.train_set.vectors[idx])
    assert len(dm.train_dataloader()) == 3
    assert dm.val_set is dm.test_set and len(dm.test_set) == 2200
    xs, ys, _ = next(iter(dm.test_dataloader()))
    assert xs.shape == (1100, 32) and set(ys.tolist()) <= {5, 6}
    # a class-disjoint validation split of the train classes works on vectors too
    dm = DMLDataModule(source, transform, batch_size=14, K=7, val_fraction=0.4)
    dm.setup()
    assert set(dm.val_set.labels.tolist()) == {3, 4} and set(dm.train_set.labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(train_classes=7),
        dict(train_classes=0),
        dict(train_points_per_class=1101),
        dict(sigma=-1.0),
        dict(test_split="val"),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        GaussianClusters(**kwargs)
