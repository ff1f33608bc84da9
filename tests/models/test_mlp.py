"""backbone=mlp: the vector backbone of the NSPA synthetic experiment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.models.mlp import MLPEmbedder

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_unit_norm_embeddings_and_gradients():
    torch.manual_seed(0)
    model = MLPEmbedder(in_dim=32, dim=16, hidden=(64, 64))
    x = torch.randn(10, 32)
    z = model(x)
    assert z.shape == (10, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(10), atol=1e-6)
    z.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    raw = MLPEmbedder(in_dim=32, dim=16, normalize=False)(x)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(10))


def test_layers_flattening_and_checks():
    linear = MLPEmbedder(in_dim=12, dim=4, hidden=())
    assert [type(m) for m in linear.body] == [] and linear.head.in_features == 12
    assert linear(torch.randn(3, 3, 2, 2)).shape == (3, 4)  # inputs are flattened
    bn = MLPEmbedder(in_dim=8, dim=4, hidden=[16], batch_norm=True)
    assert [type(m).__name__ for m in bn.body] == ["Linear", "BatchNorm1d", "ReLU"]
    with pytest.raises(ValueError, match="expects 8 input features"):
        bn(torch.randn(2, 9))
    for bad in (dict(in_dim=0), dict(dim=0), dict(hidden=[0])):
        with pytest.raises(ValueError):
            MLPEmbedder(**bad)


def test_config_reads_the_dataset_dimension():
    cfg = OmegaConf.create({"backbone": OmegaConf.load(CONF / "backbone" / "mlp.yaml")})
    assert cfg.backbone.model_name == "mlp" and cfg.backbone.dim > 0  # the keys train.py reads
    assert instantiate(cfg.backbone).in_dim == 32  # no dataset: the default
    cfg.dataset = {"source": {"dim": 7}}
    model = instantiate(cfg.backbone)
    assert model.in_dim == 7 and model(torch.randn(2, 7)).shape == (2, cfg.backbone.dim)


def test_identity_init_returns_the_normalised_input():
    x = torch.randn(5, 6)
    model = MLPEmbedder(in_dim=6, dim=6, hidden=[], head_init="identity")
    assert torch.allclose(model(x), torch.nn.functional.normalize(x, dim=1), atol=1e-6)
    unnormalised = MLPEmbedder(in_dim=6, dim=6, hidden=[], head_init="identity", normalize=False)
    assert torch.equal(unnormalised(x), x)


@pytest.mark.parametrize("kwargs", [dict(hidden=[4]), dict(dim=3), dict(head_init="orthogonal")])
def test_identity_init_refuses_what_cannot_be_the_identity(kwargs):
    args = dict(in_dim=6, dim=6, hidden=[], head_init="identity") | kwargs
    with pytest.raises(ValueError, match="init"):
        MLPEmbedder(**args)
