"""Cached activations for partial fine-tuning (dataset.source.train_from_stage=k, backbone=stage_tail): the
cache equals a direct forward of the frozen first stages; the stage tail on the cache equals the full model on
the images; the cache key follows the stage; bad stages are ConfigErrors naming the key and the range; the
pass reports its progress on stderr; BatchNorm folding is checked and dropped when it would change values."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data import cached_features
from ddtas_lightning.data.cached_features import ActivationDataset, fold_batchnorm_
from ddtas_lightning.data.image_dataset import ImageDataset
from ddtas_lightning.data.transforms import TimmTransform
from tests.conftest import compose_train

# 8 classes x 5 images of 32 px, a random-init tf_efficientnet_lite0 (no weights package needed), cached
# before stage 6: 112 x 2 x 2 activations (a cache in about a second).
TINY = [
    "experiment=stage_tail_lite0",
    "dataset.source.images.source.num_classes=8",
    "dataset.source.images.source.images_per_class=5",
    "dataset.source.images.image_size=32",
    "dataset.source.transform.image_size=32",
    "dataset.source.backbone.weights=null",
    "dataset.source.progress_every=null",
]


def _source(tmp_path, data_dir, *overrides):
    cfg = compose_train([*TINY, *overrides], tmp_path, data_dir)
    return instantiate(cfg.dataset.source), cfg


def _reference(cfg, stage: int, indices=(0, -1)):
    """The frozen stages computed directly: the seeded random init (backbone_seed 0), every image through
    timm's forward_intermediates (extra_blocks: index i = the output of stage i), float32, no folding."""
    torch.manual_seed(0)
    model = instantiate(cfg.dataset.source.backbone).eval()
    images = ImageDataset(instantiate(cfg.dataset.source.images.source).load("train"), TimmTransform(
        "tf_efficientnet_lite0", image_size=32).test)
    x = torch.stack([images[i][0] for i in indices])
    with torch.no_grad():
        want = model.backbone.forward_intermediates(x, indices=[stage - 1], extra_blocks=True,
                                                    intermediates_only=True)[0]
    return model, x, want


@pytest.mark.parametrize("stage, dtype", [(6, "float32"), (2, "float32"), (6, "float16")])
def test_cache_equals_a_direct_forward_of_the_frozen_stages(tmp_path, data_dir, stage, dtype, one_thread):
    src, cfg = _source(tmp_path, data_dir, f"dataset.source.train_from_stage={stage}", f"dataset.source.dtype={dtype}")
    ds = src.make_dataset(src.load("train"))
    assert isinstance(ds, ActivationDataset) and ds.array.dtype == np.dtype(dtype)
    _, _, want = _reference(cfg, stage)
    got = torch.stack([ds[0][0], ds[len(ds) - 1][0]])
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = float(want.abs().max())
    tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3 * scale)
    torch.testing.assert_close(got, want, **tol)
    assert ds.array is src.arrays()["features"]  # one array for every split, no copies


def test_stage_tail_on_the_cache_equals_the_full_model(tmp_path, data_dir, one_thread):
    src, cfg = _source(tmp_path, data_dir, "dataset.source.dtype=float32", "backbone.dim=16")
    ds = src.make_dataset(src.load("train"))
    full, x, _ = _reference(cfg, 6)
    full.head = torch.nn.Linear(full.backbone.num_features, 16)  # the full model with a 16-d head ...
    tail = instantiate(cfg.backbone).eval()
    tail.head.load_state_dict(full.head.state_dict())  # ... that the tail shares
    with torch.no_grad():
        got = tail(torch.stack([ds[0][0], ds[len(ds) - 1][0]]))
        torch.testing.assert_close(got, full.eval()(x), rtol=1e-4, atol=1e-5)
    assert type(tail).__name__ == "StageTail" and tail.train_from_stage == 6 and tail.in_channels == 112


def test_cache_key_follows_the_stage_and_pooled_caches_keep_theirs(tmp_path, data_dir):
    keys = {k: _source(tmp_path, data_dir, f"dataset.source.train_from_stage={k}")[0].cache_dir for k in (5, 6)}
    pooled, _ = _source(tmp_path, data_dir, "dataset.source.train_from_stage=null")
    f32, _ = _source(tmp_path, data_dir, "dataset.source.dtype=float32")
    assert len({keys[5], keys[6], pooled.cache_dir, f32.cache_dir}) == 4
    # a pooled float32 cache hashes the same manifest as before train_from_stage existed (caches stay valid)
    assert set(pooled.manifest()) == {"images", "backbone", "transform", "backbone_seed", "stages"}
    path = _source(tmp_path, data_dir, "dataset.source.train_from_stage=5")[0].materialise()
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["train_from_stage"] == 5 and manifest["dtype"] == "float16"


@pytest.mark.parametrize("stage", [0, 8])
def test_bad_stage_is_a_config_error_naming_the_key_and_range(tmp_path, data_dir, stage):
    src, _ = _source(tmp_path, data_dir, f"dataset.source.train_from_stage={stage}")
    with pytest.raises(ConfigError, match=rf"dataset.source.train_from_stage={stage}: tf_efficientnet_lite0 has "
                                          r"stages 0 \(stem\) to 7; .* integer in 1\.\.7"):
        src.materialise()
    assert not src.cache_dir.exists()  # stopped before the pass


@pytest.mark.parametrize("override, message", [
    ("dataset.source.stages=[1,2]", r"train_from_stage .* and dataset.source.stages .* set dataset.source.stages=null"),
    ("dataset.source.standardize=true", r"dataset.source.standardize=true with train_from_stage"),
    ("dataset.source.train_from_stage=late", r"dataset.source.train_from_stage must be null or an integer"),
    ("dataset.source.dtype=int8", r"dataset.source.dtype"),
])
def test_conflicting_keys_are_config_errors(tmp_path, data_dir, override, message):
    with pytest.raises(Exception) as info:
        _source(tmp_path, data_dir, override)
    err = info.value.__cause__ if info.value.__cause__ is not None else info.value  # hydra wraps it
    assert isinstance(err, ConfigError) and re.search(message, str(err)), err


def test_pass_prints_progress_and_the_cache_size_on_stderr(tmp_path, capsys):
    src, _ = _source(tmp_path, tmp_path / "data", "dataset.source.progress_every=0", "dataset.source.batch_size=16")
    src.materialise()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("feature cache:")]
    # 20 train + 20 test images in batches of 16: 16, 20 (train), 36, 40 (test), then the summary
    done = [int(m.group(1)) for ln in lines if (m := re.search(r"(\d+)/40 images \(\d+%\), [\d.]+ images/s", ln))]
    assert done == [16, 20, 36, 40]
    size = 40 * 112 * 2 * 2 * 2 / 2**20  # float16
    assert re.search(rf"40 images in [\d.]+ s \([\d.]+ images/s\), activations {size:.1f} MiB", lines[-1])


def test_folding_that_changes_values_is_dropped(tmp_path, monkeypatch, caplog, one_thread):
    def broken_fold(backbone, probe):  # folds, then spoils one weight: the check must catch it
        n = fold_batchnorm_(backbone, probe)
        with torch.no_grad():
            backbone.blocks[4][0].conv_pw.weight.add_(1.0)
        return n

    monkeypatch.setattr(cached_features, "fold_batchnorm_", broken_fold)
    src, cfg = _source(tmp_path, tmp_path / "data", "dataset.source.dtype=float32")  # its own cache
    with caplog.at_level(logging.INFO, logger=cached_features.__name__):
        ds = src.make_dataset(src.load("train"))
    assert "BatchNorm folding changed the output" in caplog.text
    _, _, want = _reference(cfg, 6)
    torch.testing.assert_close(torch.stack([ds[0][0], ds[len(ds) - 1][0]]), want, rtol=1e-4,
                               atol=1e-5 * float(want.abs().max()))


def test_fold_batchnorm_folds_every_conv_bn_pair_exactly(one_thread):
    import timm

    for name in ("tf_efficientnet_lite0", "resnet10t"):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=0).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            want = model.forward_features(x)
        assert fold_batchnorm_(model, x) == n_bn
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_stage_tail_trains_on_the_cache_through_train(tmp_path, data_dir, one_thread):
    from ddtas_lightning.runtime.training import train

    cfg = compose_train([*TINY, "dataset.source.images.source.num_classes=16", "backbone.dim=8",
                         "data.batch_size=8", "data.K=2", "data.batches_per_epoch=2", "trainer.max_epochs=1",
                         "metrics.recall_ks=[1,2]", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                         "evaluate_before_training=false"],
                        tmp_path, data_dir)
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and 0 <= metrics["test"]["test/R@1"] <= 1
    assert metrics["choices"]["backbone"] == "tf_efficientnet_lite0"
