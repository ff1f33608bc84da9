"""Cached-feature mode (dataset=cached_features): one embedding pass, reused; features equal a direct
computation; standardisation from the train split only; clear errors; a tiny study-experiment run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate

from ddtas_lightning.data.cached_features import FEATURES, MANIFEST, CachedFeatures
from ddtas_lightning.data.records import DatasetLayoutError
from ddtas_lightning.data.transforms import SimpleTransform
from tests.conftest import compose_train

# 8 classes x 5 images of 16 px (4 train, 4 test), resnet10t stages 1-2: a cache in about a second.
TINY_IMAGES = [
    "dataset.source.images.source.num_classes=8",
    "dataset.source.images.source.images_per_class=5",
    "dataset.source.images.image_size=16",
    "dataset.source.backbone.model_name=resnet10t",
    "dataset.source.stages=[1,2]",
    "dataset.source.dim=384",   # resnet10t stages 1-2: 2 x (64 + 128), checked below
]


def _source(tmp_path, data_dir, *overrides) -> tuple[CachedFeatures, object]:
    cfg = compose_train(["experiment=threshold_study", *TINY_IMAGES, *overrides], tmp_path, data_dir)
    return instantiate(cfg.dataset.source), cfg


def _stage_widths() -> int:
    m = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    return sum(2 * m.feature_info[i]["num_chs"] for i in (1, 2))


def test_tiny_dim_is_what_resnet10t_gives():
    assert _stage_widths() == 384  # keeps TINY_IMAGES honest


def test_features_equal_a_direct_forward_of_the_frozen_backbone(tmp_path, data_dir):
    src, cfg = _source(tmp_path, data_dir, "dataset.source.standardize=false")
    train = src.load("train")
    ds = src.make_dataset(train)
    # the reference: the same seeded random init, each image through timm's stages, avg and max pooled
    images = instantiate(cfg.dataset.source.images.source)
    torch.manual_seed(0)
    ref_model = instantiate(cfg.dataset.source.backbone).eval()
    tf = SimpleTransform(16).test
    from ddtas_lightning.data.image_dataset import ImageDataset

    imgs = ImageDataset(images.load("train"), tf)
    for i in (0, len(imgs) - 1):
        x = imgs[i][0][None]
        maps = ref_model.backbone.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        want = torch.cat([torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1) for f in maps], 1)[0]
        torch.testing.assert_close(ds[i][0], want, rtol=1e-4, atol=1e-5)
        assert ds[i][1] == imgs[i][1]


def test_cache_is_written_once_and_reused_and_a_changed_knob_makes_a_new_one(tmp_path, data_dir):
    src, _ = _source(tmp_path, data_dir)
    path = src.materialise()
    assert path.name == FEATURES and (path.parent / MANIFEST).is_file()
    stamp = os.stat(path).st_mtime_ns
    again, _ = _source(tmp_path, data_dir)
    assert again.materialise() == path and os.stat(path).st_mtime_ns == stamp
    other, _ = _source(tmp_path, data_dir, "dataset.source.backbone_seed=1")
    assert other.cache_dir != src.cache_dir
    assert not np.allclose(other.arrays()["features"], src.arrays()["features"])
    manifest = json.loads((path.parent / MANIFEST).read_text())
    assert manifest["backbone"]["model_name"] == "resnet10t" and manifest["stages"] == [1, 2]


def test_splits_are_class_disjoint_and_standardised_with_train_statistics_only(tmp_path, data_dir):
    src, _ = _source(tmp_path, data_dir)
    train, test = src.load("train"), src.load("test")
    assert len(train) == len(test) == 20
    assert not set(train.labels) & set(test.labels)
    xt = src.make_dataset(train).vectors
    xs = src.make_dataset(test).vectors
    torch.testing.assert_close(xt.mean(0), torch.zeros(xt.shape[1]), atol=1e-4, rtol=0)
    # the test split is transformed by the train statistics, so it is not itself centred
    assert xs.mean(0).abs().max() > 1e-2


def test_dim_mismatch_and_unreadable_cache_are_clear_errors(tmp_path, data_dir):
    src, _ = _source(tmp_path, data_dir, "dataset.source.dim=512")
    with pytest.raises(DatasetLayoutError, match=r"dim 384, but dataset.source.dim=512"):
        src.load("train")
    good, _ = _source(tmp_path / "b", tmp_path / "data_b")
    path = good.materialise()
    path.write_bytes(b"not an npz")
    broken, _ = _source(tmp_path / "b", tmp_path / "data_b")
    with pytest.raises(DatasetLayoutError, match=f"{path}: not a readable feature cache.*Delete its directory"):
        broken.load("train")


def test_study_experiment_trains_a_head_on_the_cache(tmp_path, data_dir):
    from ddtas_lightning.runtime.training import train

    cfg = compose_train(["experiment=threshold_study", *TINY_IMAGES, "dataset.source.images.source.num_classes=16",
                         "arm=study/hg_nca", "loss.threshold=0.8",
                         "data.batch_size=8", "data.K=2", "data.batches_per_epoch=2", "trainer.max_epochs=2",
                         "metrics.recall_ks=[1,2]", "backbone.hidden=[16]", "backbone.dim=8",
                         "data.meta_batch_size=4", "data.meta_K=2"], tmp_path, data_dir)
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selection"] == "val" and 0 <= metrics["test"]["test/R@1"] <= 1
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    lam = [float(r["train/lambda"]) for r in rows if r.get("train/lambda")]
    assert len(lam) == 4 and lam[0] == pytest.approx(0.8) and lam[-1] != pytest.approx(0.8)  # learned
