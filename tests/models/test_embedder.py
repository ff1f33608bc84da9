import pytest
import timm
import torch

from ddtas_lightning.models import Embedder


@pytest.mark.parametrize("pooling", ["avg", "max", "avg+max"])
def test_output_is_l2_normalised_with_dim(pooling):
    model = Embedder("resnet10t", dim=16, pooling=pooling).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_pooling_variants_differ_and_match_definition():
    model = Embedder("resnet10t", dim=8, pooling="avg+max").eval()
    feats = model.backbone.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(model.pool(feats), feats.mean((2, 3)) + feats.amax((2, 3)))


def test_frozen_batchnorm_keeps_running_stats():
    model = Embedder("resnet10t", dim=8, freeze_bn=True).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, before)
    assert bn.weight.requires_grad  # affine parameters still learn
    unfrozen = Embedder("resnet10t", dim=8, freeze_bn=False).train()
    bn2 = next(m for m in unfrozen.modules() if isinstance(m, torch.nn.BatchNorm2d))
    unfrozen(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not torch.allclose(bn2.running_mean, before)


def test_weights_load_from_local_checkpoint(tmp_path):
    reference = timm.create_model("resnet10t", num_classes=10)  # with a classifier, as real checkpoints
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    model = Embedder("resnet10t", dim=8, checkpoint_path=str(path))
    torch.testing.assert_close(model.backbone.conv1[0].weight, reference.conv1[0].weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=0), "backbone.dim"),
        (dict(pooling="mean"), "backbone.pooling"),
        (dict(model_name="not_a_model"), "backbone.model_name"),
        (dict(checkpoint_path="/nonexistent/w.pth"), "/nonexistent/w.pth"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, message):
    args = dict(model_name="resnet10t", dim=8) | kwargs
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Embedder(**args)


def test_identity_head_init_makes_the_untrained_embedder_the_pooled_features():
    from ddtas_lightning.models.embedder import Embedder

    model = Embedder("resnet10t", dim=512, head_init="identity").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.backbone.forward_features(images).mean(dim=(2, 3))
        assert torch.allclose(model(images), torch.nn.functional.normalize(pooled, dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="head_init=identity needs backbone.dim"):
        Embedder("resnet10t", dim=16, head_init="identity")
    with pytest.raises(Exception, match="head_init"):
        Embedder("resnet10t", dim=16, head_init="eye")
