"""The embedded synthetic dataset: CUB layout, determinism, regeneration on changed parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ddtas_lightning.data import CUB200, DatasetLayoutError, Synthetic
from ddtas_lightning.data import synthetic as synth

TINY = dict(num_classes=4, images_per_class=3, image_size=16)


def tree_bytes(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_materialises_cub_layout_and_loads_through_cub200(tmp_path):
    s = Synthetic(tmp_path, **TINY)
    tr, te = s.load("train"), s.load("test")
    d = tmp_path / "CUB_200_2011"
    for name in ("images.txt", "image_class_labels.txt", "classes.txt", "synthetic.json"):
        assert (d / name).is_file()
    assert (d / "images.txt").read_text().splitlines()[0] == "1 001.synthetic_001/synthetic_001_0001.png"
    assert (d / "classes.txt").read_text().splitlines()[-1] == "4 004.synthetic_004"
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (6, 2, 6, 2)
    assert sorted(set(tr.labels)) == [1, 2] and sorted(set(te.labels)) == [3, 4]
    assert s.expected_counts == {"train_images": 6, "train_classes": 2, "test_images": 6, "test_classes": 2}
    assert len(CUB200(tmp_path).load("test")) == 6  # an ordinary CUB tree
    with Image.open(te.paths[0]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (16, 16))
    assert not list(tmp_path.glob(".CUB_200_2011.*"))  # no temporary folder left behind
    manifest = json.loads((d / "synthetic.json").read_text())
    assert manifest["num_classes"] == 4 and manifest["version"] == synth.GENERATOR_VERSION


def test_deterministic_bytes(tmp_path):
    a = tree_bytes(Synthetic(tmp_path / "a", **TINY, seed=3).materialise())
    b = tree_bytes(Synthetic(tmp_path / "b", **TINY, seed=3).materialise())
    c = tree_bytes(Synthetic(tmp_path / "c", **TINY, seed=4).materialise())
    assert a == b
    assert a.keys() == c.keys() and a != c
    # An image does not depend on what else is generated (per-image random streams).
    p = synth.Synthetic(tmp_path / "d", **TINY, seed=3).params
    big = synth.SyntheticParams(**{**p.__dict__, "num_classes": 9, "images_per_class": 5})
    assert np.array_equal(np.asarray(synth.render(p, 1, 2)), np.asarray(synth.render(big, 1, 2)))


def test_reuses_and_regenerates(tmp_path, monkeypatch):
    Synthetic(tmp_path, **TINY).materialise()
    calls = []
    real = synth.write_tree
    monkeypatch.setattr(synth, "write_tree", lambda *a, **k: calls.append(1) or real(*a, **k))
    Synthetic(tmp_path, **TINY).load("train")
    assert calls == []  # same parameters: reused
    s = Synthetic(tmp_path, **{**TINY, "images_per_class": 5}, noise=0.1)
    assert len(s.load("train")) == 10 and calls == [1]  # changed parameters: regenerated in place
    assert json.loads((tmp_path / "CUB_200_2011" / "synthetic.json").read_text())["noise"] == 0.1
    assert not list(tmp_path.glob(".CUB_200_2011.*"))


def test_crash_leaves_no_partial_tree(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "render", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        Synthetic(tmp_path, **TINY).materialise()
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_a_real_cub(tmp_path, cub_tree):
    cub_tree()
    with pytest.raises(DatasetLayoutError, match=r"exists but has no synthetic.json: it is not a synthetic tree"):
        Synthetic(tmp_path, **TINY).load("train")


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Synthetic(tmp_path, num_classes=1)
    with pytest.raises(ValueError, match="parts="):
        Synthetic(tmp_path, parts=(3, 2))


def test_class_structure_without_nuisance(tmp_path):
    """With every nuisance off, instances of a class are near copies: raw-pixel 1-NN is almost perfect."""
    s = Synthetic(tmp_path, num_classes=6, images_per_class=4, image_size=32, rotation=0, scale=(1, 1),
                  translation=0, part_jitter=0, hue_jitter=0, shade_jitter=0, background="plain",
                  distractors=(0, 0), noise=0)
    p = s.params
    x = np.stack([np.asarray(synth.render(p, c, j), np.float32).ravel() for c in range(6) for j in range(4)])
    y = np.repeat(np.arange(6), 4)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() == 1.0


@pytest.mark.slow
def test_default_dataset_is_hard_for_raw_pixels_and_parallel_generation_matches(tmp_path):
    """Default knobs: raw-pixel 1-NN on the test classes stays far below a trained model's reach."""
    s = Synthetic(tmp_path / "a", num_workers=2)
    te = s.load("test")
    x = np.stack([np.asarray(Image.open(p), np.float32).ravel() for p in te.paths])
    y = np.asarray(te.labels)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    assert (y[sim.argmax(1)] == y).mean() < 0.3
    serial = Synthetic(tmp_path / "b", num_classes=6, images_per_class=3).materialise()
    parallel = Synthetic(tmp_path / "c", num_classes=6, images_per_class=3, num_workers=2).materialise()
    assert tree_bytes(serial) == tree_bytes(parallel)
