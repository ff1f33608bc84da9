"""``ToNormalizedTensor`` (the transforms' tensor tail) gives bit for bit what torchvision's
``ToTensor`` -> [``ToBGR255``] -> ``Normalize`` composition gives, alone and inside every train and
test transform (same seed, same random crop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ddtas_lightning.data.transforms import (
    CAFFE_BGR_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BNInceptionTransform,
    ImageNetTransform,
    SimpleTransform,
    ToBGR255,
    ToNormalizedTensor,
)


def photo(seed: int, size=(300, 225), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode)


def reference_tail(mean, std, bgr_255: bool):
    return T.Compose([T.ToTensor(), *([ToBGR255()] if bgr_255 else []), T.Normalize(tuple(mean), tuple(std))])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("bgr_255", [False, True])
def test_tail_equals_the_torchvision_composition(mode, bgr_255):
    mean, std = (CAFFE_BGR_MEAN, (1.0, 1.0, 1.0)) if bgr_255 else (IMAGENET_MEAN, IMAGENET_STD)
    if mode != "RGB":  # as many channels as the image
        n = len(mode)
        mean, std = (mean * 2)[:n], (std * 2)[:n]
    for seed in range(3):
        image = photo(seed, mode=mode)
        out = ToNormalizedTensor(mean, std, bgr_255=bgr_255)(image)
        ref = reference_tail(mean, std, bgr_255)(image)
        assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
        assert out.is_contiguous() and out.stride() == ref.stride()  # dense (3, H, W), as torchvision's
        assert torch.equal(out, ref)


def _reference_pipeline(t):
    """The same transform with its tail replaced by the torchvision composition."""
    steps = list(t.transforms)
    tail = steps[-1]
    assert isinstance(tail, ToNormalizedTensor)
    ref_tail = reference_tail(tail.mean.flatten().tolist(), tail.std.flatten().tolist(), tail.bgr_255)
    return T.Compose([*steps[:-1], *ref_tail.transforms])


@pytest.mark.parametrize("make", [
    lambda: BNInceptionTransform(), lambda: BNInceptionTransform(bgr_255=False), lambda: ImageNetTransform(),
    lambda: SimpleTransform(image_size=64),
], ids=["bninception", "bninception-rgb", "imagenet", "simple"])
def test_every_transform_matches_its_torchvision_reference(make):
    t = make()
    for split in ("train", "test"):
        ours, ref = getattr(t, split), _reference_pipeline(getattr(t, split))
        for seed in range(3):
            image = photo(seed)
            torch.manual_seed(seed)
            a = ours(image)
            torch.manual_seed(seed)
            b = ref(image)
            assert torch.equal(a, b), (split, seed)


def test_zero_std_is_refused():
    with pytest.raises(ValueError, match="transform.std"):
        ToNormalizedTensor((0.5, 0.5, 0.5), (1.0, 0.0, 1.0))
