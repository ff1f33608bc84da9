"""Pair miners (none, ms, asms, at_asms) against per-anchor references and PML."""

import math

import pytest
import torch
from pytorch_metric_learning import miners as pml_miners

from ddtas_lightning.miners import (
    ASMS,
    AdaptiveToleranceASMS,
    AllPairsMiner,
    MultiSimilarityMiner,
    PairSelection,
)
from tests.references import (
    angle_embeddings,
    random_batch,
    ref_all_pairs,
    ref_asms_mine,
    ref_at_asms_mine,
    ref_ms_mine,
)

CASES = [(8, 2), (32, 8), (20, 20), (12, 1), (45, 6), (80, 16)]
DTYPES = [torch.float32, torch.float64]


def _check_stats(sel: PairSelection):
    assert sel.stats["pos_pairs"] == sel.pos_mask.sum()
    assert sel.stats["neg_pairs"] == sel.neg_mask.sum()
    assert sel.stats["anchors_without_pairs"] == (~sel.valid_anchors).sum()
    for v in list(sel.stats.values()) + list(sel.thresholds.values()):
        assert isinstance(v, torch.Tensor) and v.ndim == 0


def _memory_case(dtype, seed):
    emb, labels, _ = random_batch(12, 4, dtype=dtype, seed=seed, clustered=1.0)
    mem, mem_labels, _ = random_batch(30, 6, dtype=dtype, seed=seed + 1, clustered=1.0)
    return emb @ mem.T, labels, mem_labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", CASES)
def test_none_is_all_pairs(dtype, batch, classes):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch)
    sel = AllPairsMiner()(sim, labels)
    pos, neg = ref_all_pairs(sim, labels)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
    _check_stats(sel)
    sim_m, labels, mem_labels = _memory_case(dtype, batch)
    sel = AllPairsMiner()(sim_m, labels, mem_labels)
    pos, neg = ref_all_pairs(sim_m, labels, mem_labels)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", CASES)
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_ms_matches_reference_and_pml(dtype, batch, classes, epsilon):
    emb, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch + classes, clustered=1.0)
    sel = MultiSimilarityMiner(epsilon)(sim, labels)
    pos, neg = ref_ms_mine(sim, labels, epsilon=epsilon)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
    _check_stats(sel)
    assert sel.thresholds["epsilon"].item() == pytest.approx(epsilon)
    pml = PairSelection.from_indices_tuple(pml_miners.MultiSimilarityMiner(epsilon)(emb, labels), batch)
    assert torch.equal(sel.pos_mask, pml.pos_mask) and torch.equal(sel.neg_mask, pml.neg_mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ms_against_a_memory_matches_reference_and_pml(dtype):
    emb, labels, _ = random_batch(12, 4, dtype=dtype, seed=3, clustered=1.0)
    mem, mem_labels, _ = random_batch(30, 6, dtype=dtype, seed=4, clustered=1.0)
    sel = MultiSimilarityMiner().mine_embeddings(emb, labels, mem, mem_labels)
    pos, neg = ref_ms_mine(emb @ mem.T, labels, mem_labels)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
    it = pml_miners.MultiSimilarityMiner()(emb, labels, mem, mem_labels)
    pml = PairSelection.from_indices_tuple(it, 12, 30)
    assert torch.equal(sel.pos_mask, pml.pos_mask) and torch.equal(sel.neg_mask, pml.neg_mask)


def test_ms_hand_made_angles():
    """Anchor 0 deg; positive at 20 deg (S = .940) and 100 deg (S = -.174); negatives at 50 deg
    (S = .643) and 170 deg (S = -.985). epsilon 0.1: positive 100 deg kept (-.274 < .643), positive 20
    deg dropped (.840 > .643); negative 50 deg kept (.743 > -.174), 170 deg dropped."""
    emb = angle_embeddings([0, 20, 100, 50, 170])
    labels = torch.tensor([0, 0, 0, 1, 2])
    sel = MultiSimilarityMiner(0.1)(emb @ emb.T, labels)
    assert sel.pos_mask[0].tolist() == [False, False, True, False, False]
    assert sel.neg_mask[0].tolist() == [False, False, False, True, False]


def test_ms_edge_cases_and_self_by_value():
    _, _, sim = random_batch(10, 2, dtype=torch.float64, seed=0)
    for labels in (torch.zeros(10, dtype=torch.long), torch.arange(10)):  # no negatives / no positives
        sel = MultiSimilarityMiner()(sim, labels)
        assert not sel.pos_mask.any() and not sel.neg_mask.any()
        assert sel.stats["anchors_without_pairs"] == 10
    labels = torch.arange(10) % 2
    everything = MultiSimilarityMiner(epsilon=10.0)(sim, labels)  # every pair mined
    assert torch.equal(everything.pos_mask, AllPairsMiner()(sim, labels).pos_mask)
    assert torch.equal(everything.neg_mask, AllPairsMiner()(sim, labels).neg_mask)
    nothing = MultiSimilarityMiner(epsilon=-10.0)(sim, labels)
    assert not nothing.pos_mask.any() and not nothing.neg_mask.any()
    # duplicates: positives by default (self excluded by index), dropped by the official by-value rule
    emb, labels, _ = random_batch(8, 4, dtype=torch.float64, seed=1)
    emb = torch.cat([emb, emb[:2]])
    labels = torch.cat([labels, labels[:2]])
    sim = emb @ emb.T
    sel = MultiSimilarityMiner(epsilon=10.0)(sim, labels)
    assert sel.pos_mask[0, 8] and not sel.pos_mask[0, 0]
    official = MultiSimilarityMiner(epsilon=10.0, exclude_self_by_value=True)(sim, labels)
    assert not official.pos_mask[0, 8] and not official.pos_mask.diagonal().any()
    pos, neg = ref_ms_mine(sim, labels, epsilon=10.0, self_threshold=1 - 1e-5)
    assert torch.equal(official.pos_mask, pos) and torch.equal(official.neg_mask, neg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes", CASES)
@pytest.mark.parametrize("margin", [0.1, 0.4])
def test_asms_matches_reference(dtype, batch, classes, margin):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=2 * batch + classes, clustered=1.0)
    sel = ASMS(margin)(sim, labels)
    pos, neg = ref_asms_mine(sim, labels, gamma_pos=margin, gamma_neg=margin / 10)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
    _check_stats(sel)
    assert sel.thresholds["gamma_pos"].item() == pytest.approx(margin)
    assert sel.thresholds["gamma_neg"].item() == pytest.approx(margin / 10)
    # asymmetric: never more negatives, never fewer positives than MS mining with epsilon = margin
    ms = MultiSimilarityMiner(margin)(sim, labels)
    assert not (sel.neg_mask & ~ms.neg_mask).any() and not (ms.pos_mask & ~sel.pos_mask).any()
    by_value = ASMS(margin, exclude_self_by_value=True)(sim, labels)
    pos, neg = ref_asms_mine(sim, labels, None, margin, margin / 10, self_threshold=1 - 1e-6)
    assert torch.equal(by_value.pos_mask, pos) and torch.equal(by_value.neg_mask, neg)
    sim_m, labels, mem_labels = _memory_case(dtype, batch)
    sel = ASMS(margin)(sim_m, labels, mem_labels)
    pos, neg = ref_asms_mine(sim_m, labels, mem_labels, margin, margin / 10)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)


AT_CASES = [(8, 2, 0.0), (32, 8, 0.0), (32, 8, 2.0), (20, 20, 0.0), (12, 1, 0.0), (45, 6, 1.0), (80, 16, 0.5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,classes,clustered", AT_CASES)
@pytest.mark.parametrize("count_neg_margin", ["m", "m/10"])
def test_at_asms_matches_reference(dtype, batch, classes, clustered, count_neg_margin):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch + classes, clustered=clustered)
    for margin in (0.05, 0.1, 0.3):
        sel = AdaptiveToleranceASMS(margin, count_neg_margin=count_neg_margin)(sim, labels)
        pos, neg, info = ref_at_asms_mine(sim, labels, margin=margin, count_neg_margin=count_neg_margin)
        assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
        _check_stats(sel)
        for key in ("ratio", "tolerance"):
            assert sel.stats[key].item() == pytest.approx(info[key], rel=1e-6, abs=1e-7)
        for key in ("gamma_pos", "gamma_neg"):
            assert sel.thresholds[key].item() == pytest.approx(info[key], rel=1e-6)


def test_at_asms_both_branches_and_the_tolerance_formula():
    ratios = []
    for clustered in (0.0, 3.0):
        _, labels, sim = random_batch(40, 8, dtype=torch.float64, seed=7, clustered=clustered)
        sel = AdaptiveToleranceASMS(0.1)(sim, labels)
        r, t = sel.stats["ratio"].item(), sel.stats["tolerance"].item()
        ratios.append(r)
        if r > 1:
            assert t == pytest.approx(0.5 / (1 + math.exp(-r)))
            assert sel.thresholds["gamma_pos"].item() == pytest.approx(0.1 * (1 + t))
            assert sel.thresholds["gamma_neg"].item() == pytest.approx(0.01 * (1 - t))
            # the ratio counts negatives mined with gamma_c = m over *all* positive pairs
            assert sel.stats["counted_neg_pairs"] == ASMS_count(sim, labels, 0.1)
        else:
            assert t == 0.0
            plain = ASMS(0.1)(sim, labels)
            assert torch.equal(sel.pos_mask, plain.pos_mask) and torch.equal(sel.neg_mask, plain.neg_mask)
    assert min(ratios) <= 1 < max(ratios)  # both branches exercised


def ASMS_count(sim, labels, gamma_c):
    pos, neg = ref_ms_mine(sim, labels, epsilon=gamma_c)  # MS negatives = S > minP - gamma_c
    return neg.sum()


def test_at_asms_hand_made_ratio():
    """Two classes of two at 0/10 deg and 90/100 deg plus an odd one at 5 deg (class 2): N_pos = 4.
    Negatives with S > minP - 0.1 (minP = cos 10 = .985 for the first class): only the 5-degree
    point for anchors 0 and 1 (S = .996) -> counted 2 + the class-2 anchor has no positive (counts 0)
    + the second class's anchors see nothing close -> r = 2 / 4 = 0.5 <= 1, so t = 0."""
    emb = angle_embeddings([0, 10, 90, 100, 5])
    labels = torch.tensor([0, 0, 1, 1, 2])
    sel = AdaptiveToleranceASMS(0.1)(emb @ emb.T, labels)
    assert sel.stats["all_pos_pairs"] == 4 and sel.stats["counted_neg_pairs"] == 2
    assert sel.stats["ratio"].item() == pytest.approx(0.5) and sel.stats["tolerance"].item() == 0.0


def test_at_asms_memory_and_edge_cases():
    sim_m, labels, mem_labels = _memory_case(torch.float64, 5)
    sel = AdaptiveToleranceASMS(0.2)(sim_m, labels, mem_labels)
    pos, neg, info = ref_at_asms_mine(sim_m, labels, mem_labels, margin=0.2)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
    _, _, sim = random_batch(6, 2, dtype=torch.float64, seed=0)
    sel = AdaptiveToleranceASMS()(sim, torch.arange(6))  # no positive pair at all: r = 0, nothing mined
    assert sel.stats["ratio"].item() == 0.0 and not sel.pos_mask.any() and not sel.neg_mask.any()
    with pytest.raises(ValueError):
        AdaptiveToleranceASMS(count_neg_margin="m/2")


@pytest.mark.parametrize("miner_cls", [ASMS, AdaptiveToleranceASMS])
def test_asms_duplicates_index_vs_by_value(miner_cls):
    """Exact duplicates (S = 1) stay positives with the index rule; the official by-value rule drops
    them (and would also make minP skip them)."""
    emb, labels, _ = random_batch(12, 3, dtype=torch.float64, seed=3, clustered=1.0)
    emb = torch.cat([emb, emb[:3]])
    labels = torch.cat([labels, labels[:3]])
    sim = emb @ emb.T
    m = 2.5  # gamma_pos = 2.5: every positive, even S = 1, is kept unless excluded
    sel = miner_cls(m)(sim, labels)
    official = miner_cls(m, exclude_self_by_value=True)(sim, labels)
    if miner_cls is ASMS:
        pos, neg = ref_asms_mine(sim, labels, None, m, m / 10)
        pos_v, neg_v = ref_asms_mine(sim, labels, None, m, m / 10, self_threshold=1 - 1e-6)
    else:
        pos, neg, _ = ref_at_asms_mine(sim, labels, margin=m)
        pos_v, neg_v, _ = ref_at_asms_mine(sim, labels, margin=m, self_threshold=1 - 1e-6)
    assert torch.equal(sel.pos_mask, pos) and torch.equal(sel.neg_mask, neg)
    assert torch.equal(official.pos_mask, pos_v) and torch.equal(official.neg_mask, neg_v)
    assert sel.pos_mask[0, 12] and not official.pos_mask[0, 12]  # the duplicate pair (0, 12)
    assert not sel.pos_mask.diagonal().any() and not official.pos_mask.diagonal().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_similarities_are_mined_in_float32(dtype):
    _, labels, sim = random_batch(32, 8, seed=6, clustered=1.0)
    low = sim.to(dtype)
    for miner in (MultiSimilarityMiner(), ASMS(), AdaptiveToleranceASMS(), AllPairsMiner()):
        sel = miner(low, labels)
        ref = miner(low.float(), labels)
        assert torch.equal(sel.pos_mask, ref.pos_mask) and torch.equal(sel.neg_mask, ref.neg_mask)
        assert all(v.dtype == torch.float32 for v in sel.thresholds.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_smoke_every_miner_with_a_cpu_or_cuda_generator():
    from ddtas_lightning.losses import MultiSimilarityLoss, TripletMarginLoss
    from ddtas_lightning.miners import BatchHardMiner, NSPAMiner, RandomHardMiner, SemiHardMiner

    _, labels, sim = random_batch(32, 8, seed=0, clustered=1.0)
    sim, labels = sim.cuda().requires_grad_(True), labels.cuda()
    for gen in (torch.Generator().manual_seed(0), torch.Generator(device="cuda").manual_seed(0)):
        for miner in (
            AllPairsMiner(),
            MultiSimilarityMiner(),
            ASMS(),
            AdaptiveToleranceASMS(),
            BatchHardMiner(),
            SemiHardMiner(),
            RandomHardMiner(),
            NSPAMiner(),
        ):
            sel = miner(sim, labels, epoch=25, generator=gen)
            loss_fn = TripletMarginLoss() if sel.triplets is not None else MultiSimilarityLoss()
            loss = loss_fn(sim, sel, threshold=torch.tensor([0.5, 0.1], device="cuda"))
            (g,) = torch.autograd.grad(loss, sim)
            assert loss.device.type == "cuda" and torch.isfinite(g).all()
