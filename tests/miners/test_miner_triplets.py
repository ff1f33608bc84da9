"""Triplet miners (random_hard, semi_hard, batch_hard) against per-triplet references and PML."""

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners

from ddtas_lightning.miners import BatchHardMiner, RandomHardMiner, SemiHardMiner
from ddtas_lightning.miners.selection import sim_to_distance
from tests.references import random_batch, ref_batch_hard, ref_margin_triplets

CASES = [(8, 2), (24, 6), (10, 10), (9, 1), (40, 5)]


def _triplets(sel):
    return list(zip(*(t.tolist() for t in sel.triplets)))


def _check(sel, triplets):
    assert sel.stats["triplets"] == len(triplets)
    assert sel.stats["pos_pairs"] == sel.pos_mask.sum() and sel.stats["neg_pairs"] == sel.neg_mask.sum()
    for a, p, n in triplets:
        assert sel.pos_mask[a, p] and sel.neg_mask[a, n]
    assert sel.pos_mask.sum() == len({(a, p) for a, p, _ in triplets})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,classes", CASES)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_select_all_matches_reference(dtype, batch, classes, distance):
    _, labels, sim = random_batch(batch, classes, dtype=dtype, seed=batch * classes, clustered=0.7)
    for margin in (0.1, 0.5):
        for miner, kind in [
            (RandomHardMiner(margin, distance, select="all"), "violating"),
            (SemiHardMiner(margin, distance, select="all"), "semihard"),
        ]:
            sel = miner(sim, labels)
            expected = ref_margin_triplets(sim, labels, None, margin, distance, kind)
            assert _triplets(sel) == expected
            _check(sel, expected)
            assert sel.thresholds["margin"].item() == pytest.approx(margin)


def test_select_all_against_a_memory():
    emb, labels, _ = random_batch(10, 3, dtype=torch.float64, seed=1, clustered=0.7)
    mem, mem_labels, _ = random_batch(25, 5, dtype=torch.float64, seed=2, clustered=0.7)
    sim = emb @ mem.T
    for miner, kind in [(RandomHardMiner(0.3, select="all"), "violating"), (SemiHardMiner(0.3), "semihard")]:
        sel = miner(sim, labels, mem_labels)
        assert _triplets(sel) == ref_margin_triplets(sim, labels, mem_labels, 0.3, "euclidean", kind)
        assert sel.pos_mask.shape == (10, 25)
    sel = BatchHardMiner()(sim, labels, mem_labels)
    assert _triplets(sel) == ref_batch_hard(sim, labels, mem_labels)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("pml_type,ours", [("all", RandomHardMiner), ("semihard", SemiHardMiner)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_pml_triplet_margin_miner_parity(distance, pml_type, ours, with_ref):
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (30,), generator=g)
    ref_emb = torch.randn(20, 8, generator=g, dtype=torch.float64) if with_ref else None
    ref_labels = torch.randint(0, 5, (20,), generator=g) if with_ref else None
    pml_dist = pml_distances.LpDistance() if distance == "euclidean" else pml_distances.CosineSimilarity()
    it = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets=pml_type, distance=pml_dist)(
        emb, labels, ref_emb, ref_labels
    )
    assert len(it[0]) > 0
    sel = ours(0.3, distance, select="all").mine_embeddings(emb, labels, ref_emb, ref_labels)
    assert _triplets(sel) == list(zip(*(t.tolist() for t in it)))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_batch_hard_matches_reference_and_pml(distance, with_ref):
    for batch, classes in CASES:
        g = torch.Generator().manual_seed(batch)
        emb = torch.randn(batch, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, classes, (batch,), generator=g)
        ref_emb = torch.randn(15, 8, generator=g, dtype=torch.float64) if with_ref else None
        ref_labels = torch.randint(0, classes, (15,), generator=g) if with_ref else None
        sel = BatchHardMiner(distance=distance).mine_embeddings(emb, labels, ref_emb, ref_labels)
        e = torch.nn.functional.normalize(emb, dim=1)
        r = e if ref_emb is None else torch.nn.functional.normalize(ref_emb, dim=1)
        assert _triplets(sel) == ref_batch_hard(e @ r.T, labels, ref_labels, distance)
        pml_dist = pml_distances.LpDistance() if distance == "euclidean" else pml_distances.CosineSimilarity()
        it = pml_miners.BatchHardMiner(distance=pml_dist)(emb, labels, ref_emb, ref_labels)
        assert _triplets(sel) == list(zip(*(t.tolist() for t in it)))


def test_batch_hard_margin_and_ties():
    _, labels, sim = random_batch(24, 6, dtype=torch.float64, seed=5, clustered=1.0)
    all_ = BatchHardMiner()(sim, labels)
    some = BatchHardMiner(margin=0.1)(sim, labels)
    assert _triplets(some) == ref_batch_hard(sim, labels, None, "euclidean", 0.1)
    assert 0 < len(_triplets(some)) < len(_triplets(all_))
    assert some.thresholds["margin"].item() == 0.1
    # duplicated embeddings: ties go to the lowest index
    emb, labels, _ = random_batch(4, 4, dtype=torch.float64, seed=6)
    emb = torch.cat([emb, emb, emb])  # 12 points, 3 copies each, labels 0..3 repeated
    labels = torch.cat([labels, labels + 10, labels + 20]) % 4
    sel = BatchHardMiner()(emb @ emb.T, labels)
    assert _triplets(sel) == ref_batch_hard(emb @ emb.T, labels)


@pytest.mark.parametrize("miner_cls,kind", [(RandomHardMiner, "violating"), (SemiHardMiner, "semihard")])
def test_select_random_one_qualifying_negative_per_pair(miner_cls, kind):
    _, labels, sim = random_batch(32, 8, dtype=torch.float64, seed=9, clustered=0.7)
    allowed = ref_margin_triplets(sim, labels, None, 0.3, "euclidean", kind)
    pairs_with_candidates = sorted({(a, p) for a, p, _ in allowed})
    gen = torch.Generator().manual_seed(0)
    sel = miner_cls(0.3, select="random")(sim, labels, generator=gen)
    got = _triplets(sel)
    assert [(a, p) for a, p, _ in got] == pairs_with_candidates  # exactly one per pair that has one
    assert set(got) <= set(allowed)
    # the generator drives the draw: same seed same triplets, another seed other triplets
    again = miner_cls(0.3, select="random")(sim, labels, generator=torch.Generator().manual_seed(0))
    other = miner_cls(0.3, select="random")(sim, labels, generator=torch.Generator().manual_seed(1))
    assert _triplets(again) == got and _triplets(other) != got


def test_select_random_is_uniform_over_the_candidates():
    """Chi-square test (seeded, so deterministic) of the negatives drawn for every (a, p) pair."""
    _, labels, sim = random_batch(12, 3, dtype=torch.float64, seed=2, clustered=0.3)
    miner = RandomHardMiner(margin=0.5, select="random")
    allowed = ref_margin_triplets(sim, labels, None, 0.5, "euclidean", "violating")
    cands = {}
    for a, p, n in allowed:
        cands.setdefault((a, p), []).append(n)
    counts = {k: {n: 0 for n in v} for k, v in cands.items()}
    gen = torch.Generator().manual_seed(123)
    reps = 300
    for _ in range(reps):
        for a, p, n in _triplets(miner(sim, labels, generator=gen)):
            counts[(a, p)][n] += 1
    chi2, dof = 0.0, 0
    for c in counts.values():
        expected = reps / len(c)
        chi2 += sum((x - expected) ** 2 / expected for x in c.values())
        dof += len(c) - 1
    assert dof > 50
    # mean dof, sd sqrt(2 dof): 5 sd is far beyond any plausible deviation of a uniform draw
    assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5


def test_sim_to_distance():
    s = torch.tensor([1.0, 0.5, -1.0, 1.0000001], dtype=torch.float32, requires_grad=True)
    d = sim_to_distance(s, "euclidean")
    torch.testing.assert_close(d.detach(), torch.tensor([0.0, 1.0, 2.0, 0.0]))
    d.sum().backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(sim_to_distance(s, "cosine").detach(), 1 - s.detach())
    with pytest.raises(ValueError):
        sim_to_distance(s, "manhattan")
