"""Partial fine-tuning on a CPU: the last stages of a timm backbone, trained on cached activations.

A *stage* here is one step of the backbone's forward pass at timm's coarsest useful granularity, numbered
as timm's ``feature_info[i]["stage"]`` and ``forward_intermediates(..., extra_blocks=True)`` number them:

- timm EfficientNets (``EfficientNet``: efficientnet_*, tf_efficientnet_*, the -lite models, mobilenetv2,
  mnasnet ...): stage 0 = the stem (``conv_stem`` + ``bn1``), stage i = the block group ``blocks[i - 1]``
  (i = 1 .. ``len(blocks)``; 7 for lite0 and lite2: one group per row of the EfficientNet table, each group
  one resolution and width). The head conv (``conv_head`` + ``bn2``) always belongs to the trained tail.
- timm ResNets: stage 0 = the stem (``conv1`` .. ``maxpool``), stage i = ``layer{i}`` (i = 1 .. 4).

``train_from_stage = k`` (1 <= k <= last stage) freezes and caches stages 0 .. k-1: the cache holds the
*input* of stage k (:func:`frozen_stages` computes it), and :class:`StageTail` is stages k .. last (+ the
head conv), then pooling and the embedding head, starting from the same weights as the frozen part.
For tf_efficientnet_lite0 at 224 px the input of stage k is (ch x px): k=1 32x112, 2 16x112, 3 24x56,
4 40x28, 5 80x14, 6 112x14, 7 192x7.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.models.embedder import Embedder
from ddtas_lightning.models.head_init import init_head
from ddtas_lightning.models.pretrained import resolve_checkpoint


def _families():
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    return EfficientNet, ResNet


def stage_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages in forward order (index = stage number), without the head conv."""
    EfficientNet, ResNet = _families()
    if isinstance(backbone, EfficientNet):
        return [nn.Sequential(backbone.conv_stem, backbone.bn1), *backbone.blocks]
    if isinstance(backbone, ResNet):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)
        return [stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    raise ConfigError(f"train_from_stage: stages are defined for timm EfficientNet and ResNet models, not "
                      f"{type(backbone).__name__}; use the pooled-feature cache (train_from_stage=null)")


def check_stage(backbone: nn.Module, stage, key: str, model_name: str = "") -> int:
    """``stage`` as an int in 1 .. last stage, else a ConfigError naming ``key`` and the allowed range."""
    last = len(stage_modules(backbone)) - 1
    ok = isinstance(stage, int) and not isinstance(stage, bool) and 1 <= stage <= last
    if not ok:
        name = model_name or type(backbone).__name__
        hint = (" (backbone=stage_tail trains on cached activations: dataset=cached_features with "
                "dataset.source.train_from_stage=k, e.g. experiment=stage_tail_lite0)") if stage is None else ""
        raise ConfigError(f"{key}={stage!r}: {name} has stages 0 (stem) to {last}; the first trained stage must "
                          f"be an integer in 1..{last} (the cache holds the input of that stage){hint}")
    return stage


def frozen_stages(backbone: nn.Module, stage: int) -> nn.Sequential:
    """Stages 0 .. stage-1 of ``backbone`` (its own modules, not copies): images -> the input of ``stage``."""
    return nn.Sequential(*stage_modules(backbone)[:stage])


def _drop_frozen(backbone: nn.Module, stage: int) -> None:
    """Replace stages 0 .. stage-1 by identities in place, so ``backbone.forward_features`` maps the input of
    ``stage`` to the final feature map (and the frozen weights are neither trained nor saved). The kept
    modules keep their names (an EfficientNet tail from stage 6 holds ``blocks.5`` and ``blocks.6``)."""
    EfficientNet, _ = _families()
    if isinstance(backbone, EfficientNet):
        backbone.conv_stem, backbone.bn1 = nn.Identity(), nn.Identity()
        backbone.blocks = backbone.blocks[stage - 1:]
    else:  # ResNet
        for name in ("conv1", "bn1", "act1", "maxpool"):
            setattr(backbone, name, nn.Identity())
        for i in range(1, stage):
            setattr(backbone, f"layer{i}", nn.Identity())


def _in_channels(module: nn.Module) -> int:
    return next(m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d))


class StageTail(Embedder):
    """Stages ``train_from_stage`` .. last of the timm model ``model_name`` (+ its head conv), pooling, the
    linear head and L2 normalisation: ``StageTail(cache)`` equals ``Embedder(images)`` when the cache holds
    the frozen stages' output of the same weights.

    weights / checkpoint_path / pretrained: as :func:`~ddtas_lightning.models.pretrained.embedder` (use the
    cache's). init_seed: the torch seed the backbone is built under (random-init backbones: the cache's
    ``backbone_seed``, so that both halves are one network); the linear head is drawn from the run's RNG.
    """

    def __init__(self, model_name: str, train_from_stage: int, dim: int = 128, pooling: str = "avg",
                 weights: str | None = None, pretrained: bool = False, checkpoint_path: str | None = None,
                 freeze_bn: bool = False, normalize: bool = True, init_seed: int = 0, **timm_kwargs) -> None:
        checkpoint_path = resolve_checkpoint(weights, checkpoint_path, model_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            super().__init__(model_name, dim, pooling, pretrained, checkpoint_path, freeze_bn, normalize,
                             **timm_kwargs)
        self.head = nn.Linear(self.backbone.num_features, dim)  # the run's seed, not init_seed
        init_head(self.head, self.head_init)
        self.train_from_stage = check_stage(self.backbone, train_from_stage, "backbone.train_from_stage", model_name)
        self.in_channels = _in_channels(stage_modules(self.backbone)[self.train_from_stage])
        _drop_frozen(self.backbone, self.train_from_stage)
        self.train()  # freeze_bn again (the new modules are the same objects; cheap and explicit)

    def forward(self, activations: Tensor) -> Tensor:
        if activations.ndim != 4 or activations.shape[1] != self.in_channels:
            raise ValueError(
                f"StageTail from stage {self.train_from_stage} expects activations (N, {self.in_channels}, H, W), got "
                f"{tuple(activations.shape)}: backbone.train_from_stage and dataset.source.train_from_stage must "
                "agree (and the cache must come from the same model)")
        return super().forward(activations)


__all__ = ["StageTail", "check_stage", "frozen_stages", "stage_modules"]
