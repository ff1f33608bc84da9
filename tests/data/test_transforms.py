"""Transforms: shapes, dtypes, value ranges and channel conventions; picklable; timm offline."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from ddtas_lightning.data.transforms import (
    CAFFE_BGR_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BNInceptionTransform,
    ImageNetTransform,
    SimpleTransform,
    TimmTransform,
)

RGB = (10, 20, 30)


@pytest.fixture
def flat():
    """A constant-colour landscape image: every crop of it has the same pixel values."""
    return Image.new("RGB", (300, 260), RGB)


def check(t, image, size):
    for fn in (t.train, t.test):
        x = fn(image)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
    pickle.loads(pickle.dumps(t))  # DataLoader workers under spawn


def test_simple(flat):
    t = SimpleTransform(image_size=64)
    check(t, flat, 64)
    x = t.test(flat)
    want = (torch.tensor(RGB) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean((1, 2)), want, atol=1e-3, rtol=0)
    check(SimpleTransform(image_size=32, hflip=False), Image.new("RGB", (32, 32)), 32)


def test_bninception_bgr_255(flat):
    t = BNInceptionTransform()
    check(t, flat, 227)
    x = t.test(flat)
    # BGR order, 0-255 scale, (104, 117, 128) subtracted from (B, G, R).
    want = torch.tensor([RGB[2] - CAFFE_BGR_MEAN[0], RGB[1] - CAFFE_BGR_MEAN[1], RGB[0] - CAFFE_BGR_MEAN[2]])
    torch.testing.assert_close(x.mean((1, 2)), want, atol=1e-3, rtol=0)
    assert x.std((1, 2)).max() < 1e-3
    # White maps to 255 - mean: the 0-255 range.
    assert BNInceptionTransform().test(Image.new("RGB", (256, 256), (255, 255, 255))).max() == pytest.approx(151)


def test_bninception_toggle_and_sizes(flat):
    t = BNInceptionTransform(image_size=64, resize=72, bgr_255=False)
    check(t, flat, 64)
    want = (torch.tensor(RGB) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(t.test(flat).mean((1, 2)), want, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="resize=100 must be >= image_size=227"):
        BNInceptionTransform(resize=100)


def test_imagenet_geometry(flat):
    t = ImageNetTransform()
    check(t, flat, 227)
    want = (torch.tensor(RGB) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(t.test(flat).mean((1, 2)), want, atol=1e-3, rtol=0)
    names = [type(s).__name__ for s in t.train.transforms]
    assert names[:3] == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip"]
    assert t.train.transforms[1].scale == (0.16, 1.0)
    assert [type(s).__name__ for s in t.test.transforms][:2] == ["Resize", "CenterCrop"]


def test_timm_offline(flat, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("must not build a model"))
    t = TimmTransform("resnet50")
    assert t.data_config["interpolation"] == "bicubic" and t.image_size == 224
    check(t, flat, 224)
    check(TimmTransform("vit_small_patch16_224.augreg_in21k", image_size=96,
                        train_kwargs={"scale": [0.16, 1.0], "color_jitter": 0.0}), flat, 96)
    with pytest.raises(ValueError, match="timm does not know the model 'no_such_net'"):
        TimmTransform("no_such_net")
