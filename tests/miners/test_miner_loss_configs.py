"""Every conf/loss/*.yaml and conf/miner/*.yaml instantiates with hydra and runs on an 8 x 4 batch."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.losses import MetricLoss, MultiSimilarityLoss, TripletMarginLoss
from ddtas_lightning.miners import AllPairsMiner, BaseMiner, MultiSimilarityMiner
from tests.references import random_batch

CONF = Path(__file__).resolve().parents[2] / "conf"
# pml.yaml wraps a pytorch-metric-learning loss / miner by name (embeddings in, not a similarity matrix):
# tested in tests/test_pml_interop.py.
LOSS_YAMLS = sorted(p for p in (CONF / "loss").glob("*.yaml") if p.stem != "pml")
MINER_YAMLS = sorted(p for p in (CONF / "miner").glob("*.yaml") if p.stem != "pml")


def test_the_expected_configs_exist():
    assert {p.stem for p in LOSS_YAMLS} >= {"ms", "soft_contrastive", "binomial", "contrastive", "triplet"}
    assert {p.stem for p in MINER_YAMLS} >= {
        "none",
        "ms",
        "asms",
        "at_asms",
        "batch_hard",
        "semi_hard",
        "random_hard",
        "nspa",
    }


@pytest.mark.parametrize("path", LOSS_YAMLS, ids=lambda p: p.stem)
def test_loss_yaml(path):
    cfg = OmegaConf.load(path)
    assert "threshold" in cfg
    loss_fn = instantiate(cfg)
    assert isinstance(loss_fn, MetricLoss) and loss_fn.threshold == cfg.threshold
    emb, labels, _ = random_batch(32, 8, dim=64, seed=0, clustered=0.5)
    emb = emb.clone().requires_grad_(True)
    for miner in (AllPairsMiner(), MultiSimilarityMiner()):
        sim = emb @ emb.T
        loss = loss_fn(sim, miner(sim, labels), threshold=torch.tensor(cfg.threshold, requires_grad=True))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
        (g,) = torch.autograd.grad(loss, emb)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("path", MINER_YAMLS, ids=lambda p: p.stem)
def test_miner_yaml(path):
    miner = instantiate(OmegaConf.load(path))
    assert isinstance(miner, BaseMiner)
    emb, labels, sim = random_batch(32, 8, dim=64, seed=1, clustered=0.5)
    sel = miner(sim, labels, epoch=3, generator=torch.Generator().manual_seed(0))
    for key in ("pos_pairs", "neg_pairs", "anchors_without_pairs"):
        assert key in sel.stats
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in sel.thresholds.values())
    assert sel.pos_mask.any() and sel.neg_mask.any()
    loss_fn = TripletMarginLoss() if sel.triplets is not None else MultiSimilarityLoss()
    sim = sim.clone().requires_grad_(True)
    loss = loss_fn(sim, sel)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()
