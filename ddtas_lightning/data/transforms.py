"""Image preprocessing as config: every class here has a ``.train`` and a ``.test`` callable (PIL -> tensor).

- :class:`SimpleTransform`: mild random-resized crop + flip at ``image_size`` (the synthetic data).
- :class:`BNInceptionTransform`: the DML papers' protocol for the Caffe BN-Inception (MS loss, MMSI,
  DDTAS; [mmsi] ``DataSet/CUB200_tv.py``): train Resize(256) -> RandomResizedCrop(227, scale=(0.16, 1))
  -> HFlip; test Resize(256) -> CenterCrop(227); pixels BGR in 0-255 minus (104, 117, 128) (B, G, R).
- :class:`ImageNetTransform`: the same geometry, RGB in [0, 1] normalised by ImageNet mean/std (ResNets).
- :class:`TimmTransform`: timm's own preprocessing for a named model, from its pretrained config
  (``timm.data.resolve_data_config`` + ``create_transform``); reads the registry only, no download.

All transforms are picklable (DataLoader workers under spawn/forkserver).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from torchvision import transforms as T
# torchvision (2 s: it loads torch._dynamo) is imported where a transform is built or applied, not with this
# module: the vector datasets and `python -m ddtas_lightning.data.cached_features --help` need none of it.


def _tv():
    from torchvision import transforms

    return transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)


def _pair(x: Sequence[float]) -> tuple[float, float]:
    a, b = (float(v) for v in x)
    return a, b


def _interp(name: str) -> T.InterpolationMode:
    return _tv().InterpolationMode(name.lower())


class ToBGR255:
    """RGB float tensor in [0, 1] -> BGR float tensor in [0, 255] (Caffe models' input convention)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-3).mul(255.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToNormalizedTensor:
    """PIL image -> float tensor (3, H, W): ``ToTensor`` (/255) -> [``ToBGR255``] -> ``Normalize(mean, std)``
    in fewer passes, bit for bit the same values (~35% less time than the composition at 227 px): the uint8
    image is read with ``pil_to_tensor`` (no numpy round trip), channels are flipped while still uint8, and
    the arithmetic runs in place. Non-RGB images take torchvision's ``ToTensor`` path."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], bgr_255: bool = False) -> None:
        self.mean = torch.tensor([float(m) for m in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(-1, 1, 1)
        if (self.std == 0).any():
            raise ValueError(f"transform.std must not contain 0, got {list(std)}")
        self.bgr_255 = bool(bgr_255)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image) and image.mode == "RGB":
            from torchvision.transforms.functional import pil_to_tensor

            x = pil_to_tensor(image).contiguous()  # a (3, H, W) view of H x W x 3 pixels: copy it dense first
            x = (x.flip(-3) if self.bgr_255 else x).to(torch.float32).div_(255)
        else:
            x = _tv().functional.to_tensor(image)
            x = x.flip(-3) if self.bgr_255 else x
        if self.bgr_255:
            x.mul_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"bgr_255={self.bgr_255})")


class TransformPair:
    """A ``train`` and a ``test`` callable, PIL RGB image -> float tensor (3, H, W)."""

    train: Callable[[Image.Image], torch.Tensor]
    test: Callable[[Image.Image], torch.Tensor]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n train={self.train},\n test={self.test})"


class SimpleTransform(TransformPair):
    """Light augmentation for small images (the synthetic dataset).

    train: RandomResizedCrop(image_size, scale, ratio) -> [HFlip] -> ToTensor -> Normalize
    test: Resize(image_size) -> CenterCrop(image_size) -> ToTensor -> Normalize
    """

    def __init__(self, image_size: int = 64, scale: Sequence[float] = (0.7, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        T = _tv()
        norm = [ToNormalizedTensor(mean, std)]
        flip = [T.RandomHorizontalFlip()] if hflip else []
        self.image_size = int(image_size)
        self.train = T.Compose([T.RandomResizedCrop(self.image_size, _pair(scale), _pair(ratio)), *flip, *norm])
        self.test = T.Compose([T.Resize(self.image_size), T.CenterCrop(self.image_size), *norm])


class ImageNetTransform(TransformPair):
    """The DML papers' geometry with RGB ImageNet normalisation (for ImageNet-pretrained ResNets).

    train: Resize(resize) -> RandomResizedCrop(image_size, scale, ratio) -> [HFlip] -> ToTensor -> Normalize
    test: Resize(resize) -> CenterCrop(image_size) -> ToTensor -> Normalize
    (Resize(n) scales the shorter side to n.)
    """

    def __init__(self, image_size: int = 227, resize: int = 256, scale: Sequence[float] = (0.16, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "bilinear") -> None:
        self.image_size, self.resize = int(image_size), int(resize)
        if self.resize < self.image_size:
            raise ValueError(f"transform.resize: resize={resize} must be >= image_size={image_size}")
        T = _tv()
        mode = _interp(interpolation)
        tail = self._tensor_tail(mean, std)
        flip = [T.RandomHorizontalFlip()] if hflip else []
        self.train = T.Compose([
            T.Resize(self.resize, interpolation=mode),
            T.RandomResizedCrop(self.image_size, _pair(scale), _pair(ratio), interpolation=mode),
            *flip, *tail,
        ])
        self.test = T.Compose([T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.image_size), *tail])

    def _tensor_tail(self, mean: Sequence[float], std: Sequence[float]) -> list:
        return [ToNormalizedTensor(mean, std)]


class BNInceptionTransform(ImageNetTransform):
    """The BN-Inception (Caffe weights) protocol of MS loss / MMSI / DDTAS.

    Geometry as :class:`ImageNetTransform` (256 -> 227, scale (0.16, 1)). With ``bgr_255=True`` (default)
    the tensor is BGR in [0, 255] and ``mean`` (default (104, 117, 128), in B, G, R order) is subtracted,
    ``std`` default (1, 1, 1). ``bgr_255=False`` gives RGB in [0, 1] with ImageNet mean/std unless
    ``mean``/``std`` are given (for BN-Inception ports that expect torchvision-style input).
    """

    def __init__(self, image_size: int = 227, resize: int = 256, scale: Sequence[float] = (0.16, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: bool = True, bgr_255: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 interpolation: str = "bilinear") -> None:
        self.bgr_255 = bool(bgr_255)
        if mean is None:
            mean = CAFFE_BGR_MEAN if self.bgr_255 else IMAGENET_MEAN
        if std is None:
            std = (1.0, 1.0, 1.0) if self.bgr_255 else IMAGENET_STD
        super().__init__(image_size, resize, scale, ratio, hflip, mean, std, interpolation)

    def _tensor_tail(self, mean: Sequence[float], std: Sequence[float]) -> list:
        return [ToNormalizedTensor(mean, std, bgr_255=self.bgr_255)]


class TimmTransform(TransformPair):
    """timm's preprocessing for ``model_name`` (e.g. ``resnet50``, ``vit_small_patch16_224.augreg_in21k``).

    The model's *pretrained config* (input size, interpolation, mean/std, crop_pct) is read from timm's
    registry with ``timm.models.get_pretrained_cfg``, so no model is built and no weights are fetched.
    ``image_size`` overrides the input size; ``train_kwargs`` / ``test_kwargs`` are passed on to
    ``timm.data.create_transform`` (e.g. ``{scale: [0.16, 1], color_jitter: 0.0}``).
    """

    def __init__(self, model_name: str = "resnet50", image_size: int | None = None,
                 train_kwargs: Mapping | None = None, test_kwargs: Mapping | None = None) -> None:
        from timm.data import create_transform, resolve_data_config
        from timm.models import get_pretrained_cfg, is_model

        cfg = get_pretrained_cfg(model_name)
        if cfg is None and not is_model(model_name):
            raise ValueError(f"timm does not know the model {model_name!r} (see timm.list_models())")
        data_cfg = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
        if image_size is not None:
            data_cfg["input_size"] = (3, int(image_size), int(image_size))
        self.model_name = model_name
        self.data_config = dict(data_cfg)
        self.image_size = int(data_cfg["input_size"][-1])
        self.train = create_transform(**data_cfg, is_training=True, **_plain(train_kwargs))
        self.test = create_transform(**data_cfg, is_training=False, **_plain(test_kwargs))


def _plain(kwargs: Mapping | None) -> dict:
    """OmegaConf containers -> plain dict, sequences -> tuples (timm expects tuples)."""
    if not kwargs:
        return {}
    out = {}
    for k, v in dict(kwargs).items():
        out[str(k)] = tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
    return out
