"""Transparency is composited onto a background (white by default) where images are decoded: RGBA, LA, a
palette with a transparent entry or per-entry alpha, an RGB colour key. Expected pixels computed by hand:
out = round(c * a / 255 + b * (1 - a / 255))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.folder import Folder
from ddtas_lightning.data.image_dataset import ImageDataset, open_rgb, parse_background
from ddtas_lightning.data.records import SplitRecords


def saved(tmp_path: Path, im: Image.Image, name: str = "a.png") -> Path:
    path = tmp_path / name
    im.save(path, **({"transparency": im.info["transparency"]} if "transparency" in im.info else {}))
    return path


def pixels(path: Path, **kw) -> np.ndarray:
    out = open_rgb(path, **kw)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_rgba_over_white_black_and_a_colour(tmp_path):
    # red at alpha 255, 128, 0 and blue at alpha 64
    im = Image.frombytes("RGBA", (4, 1), bytes([255, 0, 0, 255, 255, 0, 0, 128, 255, 0, 0, 0, 0, 0, 255, 64]))
    path = saved(tmp_path, im)
    assert pixels(path).tolist() == [[[255, 0, 0], [255, 127, 127], [255, 255, 255], [191, 191, 255]]]
    assert pixels(path, background=(0, 0, 0)).tolist() == [[[255, 0, 0], [128, 0, 0], [0, 0, 0], [0, 0, 64]]]
    # over (100, 200, 50): 128 -> 255*128/255 + 100*127/255 = 177.8; 0*... + 200*127/255 = 99.6; 24.9
    assert pixels(path, background=(100, 200, 50)).tolist()[0][1] == [178, 100, 25]


def test_grey_with_alpha(tmp_path):
    im = Image.frombytes("LA", (3, 1), bytes([0, 64, 200, 255, 100, 0]))
    path = saved(tmp_path, im)
    # black at 64/255 over white: 255 * 191 / 255 = 191; opaque 200 stays; fully transparent -> white
    assert pixels(path).tolist() == [[[191, 191, 191], [200, 200, 200], [255, 255, 255]]]


def test_palette_with_a_transparent_entry_and_with_per_entry_alpha(tmp_path):
    im = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    im.info["transparency"] = 1  # entry 1 (blue) fully transparent
    assert pixels(saved(tmp_path, im, "one.png")).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 255, 0]]]
    im.info["transparency"] = bytes([255, 128, 0])  # tRNS: an alpha per entry
    got = pixels(saved(tmp_path, im, "per_entry.png"), background=(0, 0, 0))
    assert got.tolist() == [[[255, 0, 0], [0, 0, 128], [0, 0, 0]]]


def test_rgb_colour_key(tmp_path):
    im = Image.frombytes("RGB", (2, 1), bytes([0, 255, 0, 10, 20, 30]))
    im.info["transparency"] = (0, 255, 0)  # PNG tRNS for RGB: this colour is transparent
    assert pixels(saved(tmp_path, im)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_null_background_drops_the_alpha_as_before(tmp_path):
    im = Image.frombytes("RGBA", (2, 1), bytes([10, 20, 30, 0, 40, 50, 60, 128]))
    assert pixels(saved(tmp_path, im), background=None).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_opaque_images_are_untouched(tmp_path):
    im = Image.frombytes("RGB", (2, 1), bytes([1, 2, 3, 250, 251, 252]))
    assert pixels(saved(tmp_path, im)).tolist() == [[[1, 2, 3], [250, 251, 252]]]


@pytest.mark.parametrize("value, rgb", [("white", (255, 255, 255)), ("Black", (0, 0, 0)), ("grey", (128, 128, 128)),
                                        ("#102030", (16, 32, 48)), (7, (7, 7, 7)), ([1, 2, 3], (1, 2, 3)),
                                        (None, None)])
def test_background_values(value, rgb):
    assert parse_background(value) == rgb


@pytest.mark.parametrize("value", ["pink", "#12345", 300, -1, [1, 2], [1, 2, 256], True, 0.5])
def test_bad_background_names_the_key(value):
    with pytest.raises(ConfigError, match=r"dataset\.source\.background must be white, black, grey"):
        parse_background(value)


def test_dataset_and_folder_carry_the_background(tmp_path):
    root = tmp_path / "tree"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGBA", (2, 2), (0, 0, 255, 128)).save(root / c / "x.png")
    source = Folder(root, split="interleaved", background=[0, 255, 0])
    assert source.background == (0, 255, 0)
    records = source.load("train")
    image, _, _ = ImageDataset(records, background=source.background)[0]
    # blue at 128/255 over green: (0, 255*127/255, 255*128/255) = (0, 127, 128)
    assert (image * 255).round().to(int)[:, 0, 0].tolist() == [0, 127, 128]
    image, _, _ = ImageDataset(SplitRecords(records.paths, records.labels))[0]  # the default: white
    assert (image * 255).round().to(int)[:, 0, 0].tolist() == [127, 127, 255]
    with pytest.raises(ConfigError, match="dataset.source.background"):
        Folder(root, background="transparent")
