"""Any timm model by name with timm's own preprocessing: ViT and DINOv2 with random weights at a tiny input
size, a local checkpoint_path, and the dinov2_cub200 recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate

from ddtas_lightning.models import Embedder
from ddtas_lightning.runtime.training import train
from tests.conftest import compose_train


@pytest.mark.parametrize("name, size", [("vit_small_patch14_dinov2", 28), ("vit_tiny_patch16_224", 32)])
def test_vit_embeds_at_a_small_input_size(name, size, one_thread):
    model = Embedder(name, dim=8, img_size=size)
    out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.data_config()["input_size"] == (3, size, size)  # what it was built for, not 518 / 224
    out.sum().backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None


def test_checkpoint_path_loads_a_local_weights_file(tmp_path, one_thread):
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    model = Embedder("vit_tiny_patch16_224", dim=8, img_size=32, checkpoint_path=str(path))
    theirs, ours = reference.state_dict(), model.backbone.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    fresh = Embedder("vit_tiny_patch16_224", dim=8, img_size=32)
    assert not torch.equal(fresh.backbone.pos_embed, reference.pos_embed)  # random init differs: the file was used


def test_dinov2_trains_a_few_steps_through_train(tiny_cfg, one_thread):
    cfg = tiny_cfg("backbone=timm", "transform=timm", "backbone.model_name=vit_small_patch14_dinov2",
                   "+backbone.img_size=28", "backbone.dim=16", "trainer.max_steps=2", "trainer.max_epochs=1",
                   "trainer.accelerator=cpu", "evaluate_before_training=false", "trainer.check_val_every_n_epoch=1")
    assert cfg.transform.image_size == 28  # transform=timm follows the ViT's input size
    train(cfg)
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["choices"]["backbone"] == "vit_small_patch14_dinov2"
    assert 0.0 <= metrics["test"]["test/R@1"] <= 1.0


def test_dinov2_cub200_recipe_resolves_to_a_consistent_model(tmp_path, one_thread):
    cfg = compose_train(["experiment=dinov2_cub200"], tmp_path, tmp_path / "data")
    assert cfg.backbone.pretrained is True and cfg.backbone.checkpoint_path is None  # never random weights
    assert cfg.backbone.model_name == "vit_small_patch14_dinov2.lvd142m" and cfg.dataset.name == "cub200"
    transform = instantiate(cfg.transform)
    assert transform.image_size == cfg.backbone.img_size == 224
    assert transform.data_config["interpolation"] == "bicubic" and transform.data_config["crop_pct"] == 1.0
    model = instantiate(cfg.backbone, pretrained=False)  # (random weights here: offline test)
    assert model.data_config()["input_size"] == (3, 224, 224) and model.dim == 512
