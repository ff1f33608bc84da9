"""BN-Inception: the timm registration, the architecture (shapes, parameter count, the Cadene key layout),
loading a Cadene-format checkpoint through ``checkpoint_path``, and training with frozen BN."""

from __future__ import annotations

import pytest
import timm
import torch

from ddtas_lightning.models import Embedder
from ddtas_lightning.models.bn_inception import INCEPTION_BLOCKS, BNInception

# Conv weights + biases + BN affine of the trunk (no classifier), derived by hand from the layer table of the
# Caffe model (see test_parameter_count_matches_the_architecture_table for the derivation).
TRUNK_PARAMETERS = 10_270_240


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cadene_state_dict(model: BNInception) -> dict[str, torch.Tensor]:
    """The state dict as the Caffe-converted file stores it: BN vectors as (1, C), no BN step counters."""
    return {
        k: (v.reshape(1, -1) if "_bn." in k else v).clone()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def test_registered_with_timm():
    assert "bninception" in timm.list_models()
    model = timm.create_model("bninception", num_classes=0)
    assert isinstance(model, BNInception) and model.num_features == 1024
    assert model.pretrained_cfg["classifier"] == "last_linear"


@pytest.mark.parametrize("size", [227, 224])
def test_feature_map_and_embedding_shapes(size):
    model = Embedder("bninception", dim=512, pooling="avg+max", freeze_bn=True).eval()
    assert model.backbone.num_features == 1024
    x = torch.randn(1, 3, size, size) * 60
    with torch.no_grad():
        feats = model.backbone.forward_features(x)
        emb = model(x)
    assert feats.shape == (1, 1024, 7, 7)
    assert emb.shape == (1, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))


def test_parameter_count_matches_the_architecture_table():
    def unit(cin, cout, k):  # conv with bias + BN affine
        return cin * cout * k * k + cout + 2 * cout

    total = unit(3, 64, 7) + unit(64, 64, 1) + unit(64, 192, 3)
    chs = 192
    for b in INCEPTION_BLOCKS:
        total += unit(chs, b.c1x1, 1) if b.c1x1 else 0
        total += unit(chs, b.c3x3_reduce, 1) + unit(b.c3x3_reduce, b.c3x3, 3)
        total += unit(chs, b.double_reduce, 1) + unit(b.double_reduce, b.double_1, 3)
        total += unit(b.double_1, b.double_2, 3)
        total += unit(chs, b.pool_proj, 1) if b.pool_proj else 0
        chs = b.c1x1 + b.c3x3 + b.double_2 + (b.pool_proj or chs)
    assert chs == 1024
    assert total == TRUNK_PARAMETERS

    trunk = BNInception(num_classes=0)
    assert sum(p.numel() for p in trunk.parameters()) == TRUNK_PARAMETERS
    with_head = BNInception(num_classes=1000)
    assert sum(p.numel() for p in with_head.parameters()) == TRUNK_PARAMETERS + 1024 * 1000 + 1000


def test_state_dict_has_the_cadene_key_layout():
    sd = cadene_state_dict(BNInception(num_classes=1000))
    # 69 conv + BN units x (conv weight, bias, BN weight, bias, running mean, running var) + last_linear
    assert len(sd) == 69 * 6 + 2
    expected = {
        "conv1_7x7_s2.weight": (64, 3, 7, 7),
        "conv1_7x7_s2_bn.running_mean": (1, 64),
        "conv2_3x3.weight": (192, 64, 3, 3),
        "inception_3a_1x1.weight": (64, 192, 1, 1),
        "inception_3a_pool_proj_bn.running_var": (1, 32),
        "inception_3c_3x3.weight": (160, 128, 3, 3),
        "inception_4e_double_3x3_1.weight": (256, 192, 3, 3),
        "inception_5a_1x1.weight": (352, 1056, 1, 1),
        "inception_5b_pool_proj.weight": (128, 1024, 1, 1),
        "inception_5b_double_3x3_2_bn.weight": (1, 224),
        "last_linear.weight": (1000, 1024),
        "last_linear.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("inception_3c_1x1", "inception_3c_pool_proj", "inception_4e_1x1")) for k in sd)


@pytest.mark.parametrize("legacy_format", [True, False])
def test_cadene_checkpoint_round_trips_through_checkpoint_path(tmp_path, legacy_format):
    reference = BNInception(num_classes=1000).eval()  # with last_linear, as the real file
    path = tmp_path / "bn_inception-52deb4733.pth"
    torch.save(cadene_state_dict(reference), path, _use_new_zipfile_serialization=not legacy_format)

    model = Embedder("bninception", dim=8, freeze_bn=True, checkpoint_path=str(path)).eval()
    loaded = model.backbone.state_dict()
    assert not any(k.startswith("last_linear") for k in loaded)
    for key, value in reference.state_dict().items():
        if not key.startswith("last_linear"):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(2, 3, 64, 64) * 60
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.forward_features(x), reference.forward_features(x))


def test_timm_loads_the_file_with_its_classifier(tmp_path):
    reference = BNInception(num_classes=1000)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cadene_state_dict(reference).items()}}, path)
    model = timm.create_model("bninception", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    torch.testing.assert_close(model.last_linear.weight, reference.last_linear.weight)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("inception_4a_1x1.weight"), r"missing keys: inception_4a_1x1\.weight"),
        (lambda sd: sd.update({"classifier.linear.weight": torch.zeros(512, 1024)}),
         r"unexpected keys: classifier\.linear\.weight"),
        (lambda sd: sd.update({"inception_3a_1x1.weight": torch.zeros(64, 191, 1, 1)}),
         r"shape mismatches: inception_3a_1x1\.weight \(64, 191, 1, 1\) \(model \(64, 192, 1, 1\)\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_key_mismatch_is_a_clear_error(tmp_path, edit, message):
    sd = cadene_state_dict(BNInception(num_classes=1000))
    edit(sd)
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=message) as info:
        Embedder("bninception", dim=8, checkpoint_path=str(path))
    assert str(path) in str(info.value) and "bn_inception-52deb4733.pth" in str(info.value)


def test_a_resnet_checkpoint_names_many_keys_briefly(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys: conv1_7x7_s2\.weight.*in all\)") as info:
        Embedder("bninception", dim=8, checkpoint_path=str(path))
    assert len(str(info.value)) < 2000


def test_pretrained_without_a_file_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no downloadable weights.*checkpoint_path"):
        Embedder("bninception", dim=8, pretrained=True)
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model("bninception", pretrained=True)


def test_unsupported_input_size_names_the_rule():
    model = BNInception(num_classes=0).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"block 4e disagree.*32k-1 to 32k\+6"):
        model.forward_features(torch.zeros(1, 3, 80, 80))


def test_forward_backward_at_96px_with_frozen_bn():
    model = Embedder("bninception", dim=16, pooling="avg+max", freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 69 and not any(bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    emb = model(torch.randn(4, 3, 96, 96) * 60)
    assert emb.shape == (4, 16)
    (emb[:2] @ emb[2:].T).sum().backward()
    torch.testing.assert_close(bns[0].running_mean, before)
    backbone = model.backbone
    for p in (backbone.conv1_7x7_s2.weight, backbone.conv1_7x7_s2_bn.weight, backbone.inception_5b_pool_proj.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
