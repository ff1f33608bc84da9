"""Every PIL mode becomes 8-bit RGB by scaling, not clipping (issue 16, defect 7: a 16-bit PNG came out
99.6% white). Checked on files written to disk and read back, against the formulas pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddtas_lightning.data.image_dataset import open_rgb

RNG = np.random.default_rng(0)


def roundtrip(tmp_path, im: Image.Image, suffix: str, **kw) -> np.ndarray:
    path = tmp_path / f"img{suffix}"
    im.save(path)
    out = open_rgb(path, **kw)
    assert out.mode == "RGB" and out.size == im.size
    return np.asarray(out)


def grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_is_scaled_from_its_full_range(tmp_path, mode):
    v = RNG.integers(0, 65536, size=(9, 11)).astype(np.int64)
    v[0, 0], v[0, 1] = 0, 65535
    im = Image.fromarray(v.astype(np.uint16)) if mode == "I;16" else Image.fromarray(v.astype(np.int32))
    assert im.mode == mode
    got = roundtrip(tmp_path, im, ".png" if mode == "I;16" else ".tiff")  # PNG cannot hold mode I
    expected = np.array([[round(x * 255 / 65535) for x in row] for row in v], dtype=np.uint8)
    np.testing.assert_array_equal(got, grey(expected))
    assert (got == 255).mean() < 0.05  # not saturated (PIL's own convert gives > 99% white here)


def test_float_image_in_unit_range(tmp_path):
    v = RNG.random((6, 7)).astype(np.float32)
    got = roundtrip(tmp_path, Image.fromarray(v), ".tiff")
    np.testing.assert_array_equal(got, grey(np.rint(v.astype(np.float64) * 255).astype(np.uint8)))


def test_float_image_in_byte_range_is_clipped(tmp_path):
    v = np.array([[-3.0, 0.0, 17.4], [254.6, 300.0, 128.0]], dtype=np.float32)
    got = roundtrip(tmp_path, Image.fromarray(v), ".tiff")
    np.testing.assert_array_equal(got, grey(np.array([[0, 0, 17], [255, 255, 128]], dtype=np.uint8)))


def test_cmyk(tmp_path):
    v = RNG.integers(0, 256, size=(5, 4, 4)).astype(np.uint8)
    got = roundtrip(tmp_path, Image.frombytes("CMYK", (4, 5), v.tobytes()), ".tiff")
    c, m, y, k = (v[..., i].astype(np.float64) / 255 for i in range(4))
    expected = np.rint(np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1) * 255)
    np.testing.assert_array_equal(got, expected.astype(np.uint8))


def test_grey_with_alpha_drops_the_alpha(tmp_path):
    v = RNG.integers(0, 256, size=(5, 6, 2)).astype(np.uint8)
    # background=None: the alpha is dropped (the default composites it onto white: tests/data/test_alpha.py)
    got = roundtrip(tmp_path, Image.frombytes("LA", (6, 5), v.tobytes()), ".png", background=None)
    np.testing.assert_array_equal(got, grey(v[..., 0]))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette(tmp_path, transparency):
    palette = RNG.integers(0, 256, size=(256, 3)).astype(np.uint8)
    idx = RNG.integers(0, 256, size=(4, 5)).astype(np.uint8)
    im = Image.frombytes("P", (5, 4), idx.tobytes())
    im.putpalette(palette.flatten().tolist())
    if transparency:
        im.info["transparency"] = 3
    got = roundtrip(tmp_path, im, ".png")
    np.testing.assert_array_equal(got, palette[idx])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1"])
def test_eight_bit_modes_are_unchanged(tmp_path, mode):
    v = RNG.integers(0, 256, size=(4, 5, 4)).astype(np.uint8)
    im = Image.frombytes("RGBA", (5, 4), v.tobytes()).convert(mode)
    got = roundtrip(tmp_path, im, ".png", background=None)  # RGBA: alpha dropped (composite: test_alpha.py)
    np.testing.assert_array_equal(got, np.asarray(im.convert("RGB")))
