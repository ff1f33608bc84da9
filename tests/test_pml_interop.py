"""pytorch-metric-learning inside the framework (loss=pml / miner=pml) and our miners and losses inside plain
PML code (its indices_tuple convention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.losses import MultiSimilarityLoss
from ddtas_lightning.losses.pml import PMLLoss, as_pml_loss
from ddtas_lightning.miners import MultiSimilarityMiner, PairSelection
from ddtas_lightning.miners.pml import PMLMiner, as_pml_miner
from ddtas_lightning.runtime.training import train


def batch(seed=0, classes=4, k=4, dim=8, offset=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(classes * k, dim, generator=g), dim=1).requires_grad_()
    labels = torch.arange(classes).repeat_interleave(k) + offset
    return emb, labels


def test_readme_snippet_our_miners_and_losses_in_plain_pml():
    # --- the README snippet -------------------------------------------------------------------------
    import torch
    from pytorch_metric_learning import losses

    from ddtas_lightning.losses import SoftContrastiveLoss
    from ddtas_lightning.losses.pml import as_pml_loss
    from ddtas_lightning.miners import AdaptiveToleranceASMS, NSPAMiner
    from ddtas_lightning.miners.pml import as_pml_miner

    embeddings = torch.randn(32, 16, requires_grad=True)
    labels = torch.arange(8).repeat_interleave(4)
    mine = as_pml_miner(AdaptiveToleranceASMS(margin=0.1))           # DDTAS' miner, PML calling convention
    pairs = mine(embeddings, labels)                                  # (a1, p, a2, n), like any PML miner
    pml_loss = losses.MultiSimilarityLoss()(embeddings, labels, pairs)   # a PML loss on our pairs
    our_loss = as_pml_loss(SoftContrastiveLoss(threshold=0.7))(embeddings, labels, pairs)  # ours, PML style
    triplets = as_pml_miner(NSPAMiner())(embeddings, labels, epoch=0, generator=torch.Generator().manual_seed(0))
    (pml_loss + our_loss + losses.TripletMarginLoss(margin=0.2)(embeddings, labels, triplets)).backward()
    # -------------------------------------------------------------------------------------------------
    sel = AdaptiveToleranceASMS(margin=0.1).mine_embeddings(embeddings, labels)
    a1, p, a2, n = pairs
    assert torch.equal(sel.pos_mask.nonzero(), torch.stack([a1, p], 1))
    assert torch.equal(sel.neg_mask.nonzero(), torch.stack([a2, n], 1))
    assert len(triplets) == 3 and bool((labels[triplets[0]] == labels[triplets[1]]).all())
    assert bool((labels[triplets[0]] != labels[triplets[2]]).all())
    e = F.normalize(embeddings.detach(), dim=1)
    direct = SoftContrastiveLoss(threshold=0.7)(e @ e.T, sel)
    assert float(our_loss.detach()) == pytest.approx(float(direct), rel=1e-6)
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


def test_our_ms_miner_in_pml_gives_pml_pairs_and_loss():
    emb, labels = batch(1)
    ours = as_pml_miner(MultiSimilarityMiner(epsilon=0.1))(emb, labels)
    theirs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    as_set = lambda t: (set(zip(t[0].tolist(), t[1].tolist())), set(zip(t[2].tolist(), t[3].tolist())))  # noqa: E731
    assert as_set(ours) == as_set(theirs)
    ms = pml_losses.MultiSimilarityLoss()
    assert float(ms(emb, labels, ours).detach()) == pytest.approx(float(ms(emb, labels, theirs).detach()), rel=1e-6)
    # and our MS loss, called PML-style on PML's pairs, is PML's (same alpha, beta, base)
    mine_loss = as_pml_loss(MultiSimilarityLoss(scale_pos=2.0, scale_neg=40.0, threshold=0.5))(emb, labels, theirs)
    theirs_loss = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.5)(emb, labels, theirs)
    assert float(mine_loss) == pytest.approx(float(theirs_loss), rel=1e-5)


def proxy_anchor_reference(emb, labels, proxies, alpha=32.0, delta=0.1):
    """Proxy-Anchor loss (Kim et al., CVPR 2020, eq. 4) from its definition, one proxy at a time:
    1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
      + 1/|P| sum_{p in P} log(1 + sum_{x in X_p-} exp(alpha (s(x,p) + delta)))."""
    e, w = F.normalize(emb.double(), dim=1), F.normalize(proxies.double(), dim=1)
    pos_terms, neg_terms = [], []
    for c in range(len(w)):
        s = e @ w[c]
        mine = labels == c
        if mine.any():
            pos_terms.append(torch.log1p(torch.exp(-alpha * (s[mine] - delta)).sum()))
        neg_terms.append(torch.log1p(torch.exp(alpha * (s[~mine] + delta)).sum()))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / len(neg_terms)


def test_proxy_anchor_through_the_wrapper_matches_the_formula_with_raw_class_ids():
    emb, labels = batch(2, classes=3, k=3, dim=6, offset=100)  # CUB-like raw ids 100, 101, 102
    loss = PMLLoss("ProxyAnchorLoss", kwargs={"margin": 0.1, "alpha": 32}, num_classes=5, embedding_size=6)
    value = loss(emb @ emb.T, PairSelection.all_pairs(labels), embeddings=emb, labels=labels)
    assert loss.class_ids.tolist() == [100, 101, 102, -1, -1]
    # slot c <-> raw id 100 + c; unused proxies 3, 4 only enter the negative sum (as in PML with 5 classes)
    ref = proxy_anchor_reference(emb.detach(), labels - 100, loss.loss.proxies.detach())
    assert float(value) == pytest.approx(float(ref), rel=1e-5)
    value.backward()
    assert loss.loss.proxies.grad is not None and float(loss.loss.proxies.grad.abs().sum()) > 0
    # a new class later takes the next free slot; the old ones keep theirs
    assert loss.slots(torch.tensor([102, 99, 100])).tolist() == [2, 3, 0] and loss.class_ids[3] == 99
    with pytest.raises(ValueError, match="loss.num_classes=5"):
        loss.slots(torch.tensor([1, 2]))


def test_mined_pairs_reach_the_pml_loss_as_indices_tuple():
    emb, labels = batch(3)
    sel = PairSelection.all_pairs(labels)
    sel.pos_mask &= torch.cumsum(sel.pos_mask.int(), 1) == 1  # keep one positive per anchor
    sel.neg_mask &= torch.rand(sel.neg_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    wrapped = PMLLoss("ContrastiveLoss", kwargs={"pos_margin": 0.0, "neg_margin": 1.0})
    plain = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    got = wrapped(emb @ emb.T, sel, embeddings=emb, labels=labels)
    assert float(got) == pytest.approx(float(plain(emb, labels, sel.to_indices_tuple())), rel=1e-6)
    unmined = wrapped(emb @ emb.T, PairSelection.all_pairs(labels), embeddings=emb, labels=labels)
    assert float(unmined) == pytest.approx(float(plain(emb, labels)), rel=1e-6)
    assert float(got) != pytest.approx(float(unmined))  # the mining mattered


def test_pml_miner_selection_is_its_indices_tuple():
    emb, labels = batch(4)
    miner = PMLMiner("TripletMarginMiner", kwargs={"margin": 0.2, "type_of_triplets": "semihard"})
    sel = miner(emb @ emb.T, labels, embeddings=emb)
    ref = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb.detach(), labels)
    assert all(torch.equal(a, b) for a, b in zip(sel.triplets, ref))
    assert int(sel.stats["triplets"]) == len(ref[0])


def test_cross_batch_memory_is_checkpointed():
    loss = PMLLoss("ContrastiveLoss", memory_size=12, embedding_size=8)
    for seed in range(2):
        emb, labels = batch(seed, classes=2, k=4)
        loss(emb @ emb.T, PairSelection.all_pairs(labels), embeddings=emb, labels=labels)
    state = loss.state_dict()
    assert state["loss.embedding_memory"].shape == (12, 8)
    fresh = PMLLoss("ContrastiveLoss", memory_size=12, embedding_size=8)
    fresh.load_state_dict(state)
    assert fresh.loss.queue_idx == loss.loss.queue_idx == 4 and fresh.loss.has_been_filled
    emb, labels = batch(7, classes=2, k=4)
    a = loss(emb @ emb.T, PairSelection.all_pairs(labels), embeddings=emb, labels=labels)
    b = fresh(emb @ emb.T, PairSelection.all_pairs(labels), embeddings=emb, labels=labels)
    assert float(a) == float(b) and not math.isnan(float(a))
    with pytest.raises(ConfigError, match="CrossBatchMemory does not support ProxyAnchorLoss"):
        PMLLoss("ProxyAnchorLoss", num_classes=3, embedding_size=8, memory_size=12)


def test_bad_names_and_missing_class_count_are_clear_errors():
    with pytest.raises(ConfigError, match="loss.name='NoSuchLoss' is not a pytorch-metric-learning class; one of: .*ProxyAnchorLoss"):
        PMLLoss("NoSuchLoss")
    with pytest.raises(ConfigError, match="loss.num_classes: ArcFaceLoss needs it"):
        PMLLoss("ArcFaceLoss", embedding_size=8)
    with pytest.raises(ConfigError, match="miner.name='Nope'"):
        PMLMiner("Nope")


def test_proxy_loss_trains_resumes_and_evaluates_through_train(tiny_cfg, one_thread):
    args = ["loss=pml", "loss.name=ProxyAnchorLoss", "loss.num_classes=6", "miner=none", "+optimizer.loss_lr=0.05",
            "trainer.accelerator=cpu", "trainer.check_val_every_n_epoch=1", "evaluate_before_training=false",
            "scheduler=none"]  # (cosine follows max_epochs, which the resume changes)
    cfg = tiny_cfg(*args, "trainer.max_epochs=1")
    train(cfg)
    from pathlib import Path

    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    proxies = ckpt["state_dict"]["loss_fn.loss.proxies"]
    assert proxies.shape == (6, 16)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == 0.05 and groups[0]["lr"] == 2e-3
    assert int((ckpt["state_dict"]["loss_fn.class_ids"] >= 0).sum()) >= 2
    cfg2 = tiny_cfg(*args, "trainer.max_epochs=2", "ckpt_path=last")
    train(cfg2)
    import json

    metrics = json.loads((Path(cfg2.paths.output_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/R@1"] <= 1.0 and metrics["global_steps"] > ckpt["global_step"]
    resumed = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]["loss_fn.loss.proxies"]
    assert not torch.equal(resumed, proxies)  # the proxies kept training after the resume


def test_pml_under_a_virtual_step_policy_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="threshold_policy=static only"):
        train(tiny_cfg("loss=pml", "threshold_policy=meta", "data.meta_batch_size=4", "data.meta_K=2"))


def test_without_pml_installed_the_options_say_which_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"loss=pml needs pytorch-metric-learning: pip install -e '\.\[pml\]'"):
        PMLLoss("ContrastiveLoss")
    with pytest.raises(ConfigError, match=r"miner=pml needs pytorch-metric-learning"):
        PMLMiner("MultiSimilarityMiner")


def test_kwargs_from_the_config_reach_the_pml_class(tiny_cfg):
    from hydra.utils import instantiate

    cfg = tiny_cfg("loss=pml", "loss.name=TripletMarginLoss", "+loss.kwargs.margin=0.3",
                   "miner=pml", "miner.name=TripletMarginMiner", "+miner.kwargs.type_of_triplets=hard")
    loss, miner = instantiate(cfg.loss), instantiate(cfg.miner)
    assert loss.loss.margin == 0.3 and miner.miner.type_of_triplets == "hard"
