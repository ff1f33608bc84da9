"""ImageDataset: items, attributes, and bad images with on_bad_image = fail / skip (also in DataLoader workers)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.data import DataLoader

from ddtas_lightning.data import CUB200, DatasetLayoutError, ImageDataset, SimpleTransform, SplitRecords


@pytest.fixture
def records(tmp_path, helpers):
    """3 classes (ids 10, 20, 30) x 3 images; test-style query/gallery flags."""
    paths, labels = [], []
    for c in (10, 20, 30):
        for j in range(3):
            paths.append(helpers.write_image(tmp_path / f"{c}_{j}.png", seed=c + j, size=12))
            labels.append(c)
    return SplitRecords(paths, labels, is_query=[j == 0 for j in range(9)], is_gallery=[True] * 9)


def test_items_and_attributes(records):
    ds = ImageDataset(records, SimpleTransform(image_size=8).test)
    assert len(ds) == 9
    x, y, i = ds[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert (y, i) == (20, 4) and isinstance(y, int) and isinstance(i, int)
    assert ds.labels.dtype == torch.long and ds.labels.tolist() == records.labels
    assert ds.is_query.dtype == torch.bool and ds.is_query.sum() == 1 and bool(ds.is_gallery.all())
    assert ds.paths == records.paths
    raw, _, _ = ImageDataset(records)[0]  # no transform: float in [0, 1]
    assert raw.shape == (3, 12, 12) and 0 <= raw.min() and raw.max() <= 1


def test_default_flags_and_grayscale(tmp_path):
    from PIL import Image

    p = tmp_path / "gray.png"
    Image.new("L", (5, 5), 128).save(p)
    ds = ImageDataset(SplitRecords([p, p], [1, 1]))
    assert bool(ds.is_query.all()) and bool(ds.is_gallery.all())
    assert ds[0][0].shape == (3, 5, 5)  # converted to RGB
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageDataset(SplitRecords([p], [1]), on_bad_image="ignore")


@pytest.mark.parametrize("kind", ["corrupt", "missing", "truncated"])
def test_fail_names_the_file(records, helpers, kind):
    bad = records.paths[4]
    if kind == "corrupt":
        helpers.corrupt(bad)
    elif kind == "missing":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:60])
    ds = ImageDataset(records, on_bad_image="fail")
    with pytest.raises(DatasetLayoutError, match=rf"cannot read image {bad} \(item 4, class 20\): .*Expected "
                                                 r"an existing, readable image file") as info:
        ds[4]
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained PIL traceback
    if kind == "missing":
        assert "file not found" in str(info.value)


def test_skip_substitutes_same_class_deterministically(records, helpers):
    helpers.corrupt(records.paths[3])  # class 20: items 3 (bad), 4, 5
    helpers.corrupt(records.paths[4])
    good = ImageDataset(SplitRecords(records.paths[5:6], [20]))[0][0]
    ds = ImageDataset(records, on_bad_image="skip")
    x, y, i = ds[3]
    assert (y, i) == (20, 3)  # the requested label and index are kept
    assert torch.equal(x, good)  # 3 -> 4 (bad) -> 5: the next readable image of the class, cyclically
    assert ds.num_skipped == 2 and ds.skipped_paths == [records.paths[3], records.paths[4]]
    assert torch.equal(ds[4][0], good) and ds.num_skipped == 2  # each bad file is counted once
    # The same substitute whatever is already known: a fresh dataset asked for item 4 first.
    ds2 = ImageDataset(records, on_bad_image="skip")
    assert torch.equal(ds2[4][0], good) and torch.equal(ds2[3][0], good)


def test_skip_whole_class_unreadable(records, helpers):
    for p in records.paths[6:9]:
        helpers.corrupt(p)
    ds = ImageDataset(records, on_bad_image="skip")
    with pytest.raises(DatasetLayoutError, match=r"no image of its class 30 is readable \(3 listed"):
        ds[7]
    with pytest.raises(DatasetLayoutError, match=r"no image of class 30 is readable"):
        ImageDataset(records, on_bad_image="skip").verify()


def test_verify(records, helpers, caplog):
    helpers.corrupt(records.paths[1])
    records.paths[8].unlink()
    with pytest.raises(DatasetLayoutError, match=r"2 of 9 images are unreadable: .*1.png .*30_2.png"):
        ImageDataset(records).verify()
    ds = ImageDataset(records, on_bad_image="skip")
    with caplog.at_level("WARNING"):
        assert ds.verify() == [records.paths[1], records.paths[8]]
    assert ds.num_skipped == 2 and "2 of 9 images are unreadable" in caplog.text
    assert ds[8][1:] == (30, 8)


def test_dataloader_workers_fail_with_clear_message(records, helpers):
    bad = helpers.corrupt(records.paths[5])
    ds = ImageDataset(records, SimpleTransform(image_size=8).test, on_bad_image="fail")
    it = iter(DataLoader(ds, batch_size=3, num_workers=2))
    try:
        with pytest.raises(DatasetLayoutError) as info:
            list(it)
        msg = str(info.value)
    finally:
        for _ in it:  # drain the other worker's batch: torch otherwise waits 5 s per worker at shutdown
            pass
        del it, info
        gc.collect()
    assert f"cannot read image {bad} (item 5, class 20)" in msg
    assert "The above exception was the direct cause" not in msg and "During handling" not in msg
    assert "PIL/Image.py" not in msg  # no bare PIL traceback
    assert msg.count("Traceback") == 1


def test_dataloader_workers_skip_count_reaches_parent(records, helpers):
    helpers.corrupt(records.paths[0])
    helpers.corrupt(records.paths[7])
    ds = ImageDataset(records, SimpleTransform(image_size=8).test, on_bad_image="skip")
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    labels = torch.cat([b[1] for b in batches])
    index = torch.cat([b[2] for b in batches])
    assert labels.tolist() == records.labels and index.tolist() == list(range(9))
    assert ds.num_skipped == 2  # flags set in the worker processes are seen here (shared memory)


def test_works_with_a_loader(cub_tree):
    ds = ImageDataset(CUB200(cub_tree()).load("test"), SimpleTransform(image_size=8).train)
    x, y, i = next(iter(DataLoader(ds, batch_size=6)))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [3, 3, 3, 4, 4, 4] and i.tolist() == list(range(6))
