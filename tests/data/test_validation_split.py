"""Model selection on held-out train classes (data.selection=val, the default): the validation classes
are train classes, disjoint from the classes trained on and from the test classes; k folds partition
the train classes (fraction 1/k = the last fold); data.selection=test (the papers' protocol) validates
on the test split itself."""

from __future__ import annotations

import pytest

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.datamodule import DMLDataModule, validation_classes
from ddtas_lightning.data.gaussian_clusters import GaussianClusters, IdentityTransform


def module(**kw) -> DMLDataModule:
    source = GaussianClusters(num_classes=16, points_per_class=8, dim=4, train_classes=12, train_points_per_class=6,
                              seed=0)
    dm = DMLDataModule(source, IdentityTransform(), batch_size=8, K=2, **kw)
    dm.setup()
    return dm


def classes(dataset) -> set[int]:
    return set(dataset.labels.tolist())


def test_default_validates_on_held_out_train_classes():
    dm = module()
    train, val, test = classes(dm.train_set), classes(dm.val_set), classes(dm.test_set)
    assert len(val) == 3 and len(train) == 9 and not train & val and not (train | val) & test
    assert dm.test_set is not dm.val_set


@pytest.mark.parametrize("folds", [2, 3, 4, 5])
def test_folds_partition_the_train_classes(folds):
    ids = list(range(12))
    blocks = [validation_classes(ids, 0.0, folds, f) for f in range(folds)]
    assert sorted(c for b in blocks for c in b) == ids  # each class validates in exactly one fold
    assert all(len(b) in (12 // folds, 12 // folds + 1) for b in blocks)
    for f in range(folds):
        dm = module(val_folds=folds, val_fold=f)
        assert classes(dm.val_set) == set(blocks[f]) and not classes(dm.train_set) & set(blocks[f])


def test_fraction_one_over_k_is_the_last_fold():
    assert validation_classes(list(range(12)), 0.25) == validation_classes(list(range(12)), 0.0, 4, 3) == [9, 10, 11]


def test_papers_protocol_validates_on_the_test_split():
    dm = module(selection="test")
    assert dm.val_set is dm.test_set and len(classes(dm.train_set)) == 12


@pytest.mark.parametrize("kw, message", [
    ({"val_folds": 13}, r"data.val_folds=13 must be an integer in \[2, 12\]"),
    ({"val_folds": 3, "val_fold": 3}, r"data.val_fold=3 must be an integer in \[0, 2\]"),
    ({"val_fraction": 0.0}, r"data.val_fraction=0.0 leaves 0 of 12 train classes .* data.selection=test"),
])
def test_bad_split_settings_name_the_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        module(**kw)
