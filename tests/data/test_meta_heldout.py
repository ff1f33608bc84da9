"""data.meta_source=heldout: the meta batch comes from its own classes, class-disjoint from the
train batches and from validation."""

from __future__ import annotations

import pytest

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.datamodule import DMLDataModule
from ddtas_lightning.data.gaussian_clusters import GaussianClusters, IdentityTransform


def _module(**kw):
    source = GaussianClusters(num_classes=16, points_per_class=8, dim=4, train_classes=12, train_points_per_class=6, seed=0)
    dm = DMLDataModule(source, IdentityTransform(), batch_size=8, K=2, val_fraction=0.25, with_meta_batch=True,
                       meta_batch_size=4, meta_K=2, **kw)
    dm.setup()
    return dm


def _batches(dm, n=30):
    sampler = dm.train_sampler()
    labels = dm.train_set.labels
    out = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in list(sampler)[:n]:
            train, meta = batch[:dm.batch_size], batch[dm.batch_size:]
            out.append((set(labels[train].tolist()), set(labels[meta].tolist())))
    return out


def test_heldout_meta_classes_are_disjoint_from_train_and_val():
    dm = _module(meta_source="heldout", meta_fraction=0.25)
    val = set(dm.val_set.labels.tolist())
    batches = _batches(dm)
    train_seen = set().union(*(t for t, _ in batches))
    meta_seen = set().union(*(m for _, m in batches))
    assert len(val) == 3 and len(meta_seen) == 2 and len(train_seen) == 7  # 12 = 7 train + 2 meta + 3 val
    assert not train_seen & meta_seen and not (train_seen | meta_seen) & val
    assert meta_seen == {7, 8}  # the last quarter of the 9 classes left after validation (raw ids 0..8)


def test_train_source_meta_batch_shares_the_train_classes():
    dm = _module()
    batches = _batches(dm)
    train_seen = set().union(*(t for t, _ in batches))
    meta_seen = set().union(*(m for _, m in batches))
    assert meta_seen <= train_seen and len(train_seen) == 9


def test_bad_meta_source_and_fraction_name_the_key():
    with pytest.raises(ConfigError, match="data.meta_source must be one of train, heldout"):
        _module(meta_source="val")
    with pytest.raises(ConfigError, match="data.meta_fraction=0.01"):
        _module(meta_source="heldout", meta_fraction=0.01)
