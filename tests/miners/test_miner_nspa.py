"""NSPA: the annealing schedule, the vectorised selection vs a per-pair loop replaying the same draws,
the spec's sanity rules, and the policy frequencies vs the probabilities."""

import itertools

import pytest
import torch

from ddtas_lightning.miners import NSPAMiner, nspa_probabilities, nspa_select
from ddtas_lightning.miners.selection import label_masks, sim_to_distance
from tests.references import nspa_schedule_recursive, random_batch, ref_nspa

# spec nspa.md §1.3 table: epochs -> (P_H, P_SH, P_H*) with the default schedule
SPEC_TABLE = [
    (0, (1.0, 0.0, 0.0)),
    (9, (1.0, 0.0, 0.0)),
    (10, (0.89, 0.10, 0.01)),
    (19, (0.89, 0.10, 0.01)),
    (20, (0.78, 0.20, 0.02)),
    (55, (0.45, 0.50, 0.05)),
    (95, (0.01, 0.90, 0.09)),
    (100, (0.0, 0.90, 0.10)),
    (209, (0.0, 0.80, 0.20)),
    (300, (0.0, 0.70, 0.30)),
    (500, (0.0, 0.50, 0.50)),
    (5000, (0.0, 0.50, 0.50)),
]


@pytest.mark.parametrize("epoch,expected", SPEC_TABLE)
def test_schedule_matches_the_spec_table(epoch, expected):
    got = nspa_probabilities(epoch)
    assert got == pytest.approx(expected, abs=1e-12)
    assert sum(got) == pytest.approx(1.0)
    assert NSPAMiner().probabilities(epoch) == got


def test_schedule_closed_form_and_recursion():
    for k in range(0, 201):
        closed = (
            max(0.0, 1 - min(0.1 * k, 1 - min(0.01 * k, 0.5)) - min(0.01 * k, 0.5)),
            min(0.1 * k, 1 - min(0.01 * k, 0.5)),
            min(0.01 * k, 0.5),
        )
        got = nspa_probabilities(10 * k + 3)  # any epoch inside the k-th block
        assert got == pytest.approx(closed, abs=1e-12)
        assert got == pytest.approx(nspa_schedule_recursive(k), abs=1e-12)
    # phases: random-hard gone after 10 updates, fixed from 50 on
    assert nspa_probabilities(100)[0] == 0.0 and nspa_probabilities(99)[0] > 0
    assert nspa_probabilities(490) != nspa_probabilities(500) == nspa_probabilities(10**6)
    # other units / steps / a non-default start follow the author's recursion
    assert nspa_probabilities(4000, update_every=2000) == pytest.approx(nspa_schedule_recursive(2))
    for k in (0, 1, 3, 7, 12, 60):
        for p_init in [(0.2, 0.5, 0.3), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0)]:
            got = nspa_probabilities(k, update_every=1, sh_step=0.05, h_step=0.02, h_max=0.4, p_init=p_init)
            assert got == pytest.approx(nspa_schedule_recursive(k, p_init, 0.05, 0.02, 0.4), abs=1e-12)


def _replay(dist, labels, probs, margin, seed, draw, unordered, on_empty):
    """Run nspa_select with a seeded generator and replay its draws for the per-pair reference."""
    pos, neg = label_masks(labels)
    out = nspa_select(
        dist,
        pos,
        neg,
        probs,
        margin,
        torch.Generator().manual_seed(seed),
        draw=draw,
        unordered=unordered,
        on_empty=on_empty,
    )
    num_pairs = int(torch.triu(pos, 1).sum() if unordered else pos.sum())
    g = torch.Generator().manual_seed(seed)
    u_pol = torch.rand(num_pairs if draw == "pair" else 1, generator=g)
    keys = torch.rand(num_pairs, dist.shape[1], generator=g)
    expected = ref_nspa(dist, labels, probs, margin, u_pol, keys, unordered, on_empty)
    return out, expected


@pytest.mark.parametrize(
    "probs,draw",
    [
        ((1.0, 0.0, 0.0), "pair"),
        ((0.0, 1.0, 0.0), "pair"),
        ((0.0, 0.0, 1.0), "pair"),
        ((0.3, 0.4, 0.3), "pair"),
    ]
    + [((0.3, 0.4, 0.3), "batch")],
)
@pytest.mark.parametrize("unordered", [True, False])
@pytest.mark.parametrize("on_empty", ["skip", "fallback_random_hard", "fallback_hardest"])
def test_select_matches_the_per_pair_reference(probs, draw, unordered, on_empty):
    fallbacks = 0
    for (batch, classes, seed, clustered), margin in itertools.product(
        [(16, 4, 0, 0.7), (21, 7, 1, 0.7), (9, 1, 2, 0.7), (24, 3, 3, 0.0)], (0.1, 0.4)
    ):
        _, labels, sim = random_batch(batch, classes, dtype=torch.float64, seed=seed, clustered=clustered)
        dist = sim_to_distance(sim, "euclidean")
        (a, p, n, policy, stats), expected = _replay(
            dist, labels, probs, margin, seed, draw, unordered, on_empty
        )
        got = list(zip(a.tolist(), p.tolist(), n.tolist(), policy.tolist()))
        assert got == expected
        assert stats["skipped_pairs"] + len(got) == stats["candidate_pairs"]
        for i, name in enumerate(("random_hard", "semi_hard", "hardest")):
            assert stats[f"triplets_{name}"] == sum(1 for t in got if t[3] == i)
            fallbacks += int(stats[f"triplets_{name}"] - stats[f"drawn_{name}"]) if i != 1 else 0
    if probs == (0.0, 1.0, 0.0) and on_empty != "skip":
        assert fallbacks > 0  # the fallback path was exercised


def test_returned_triplets_obey_their_policy():
    _, labels, sim = random_batch(32, 8, dtype=torch.float64, seed=3, clustered=0.7)
    dist = sim_to_distance(sim, "euclidean")
    pos, neg = label_masks(labels)
    m = 0.4
    a, p, n, policy, _ = nspa_select(dist, pos, neg, (0.3, 0.4, 0.3), m, torch.Generator().manual_seed(0))
    assert set(policy.tolist()) == {0, 1, 2}
    ell = dist[a, p] - dist[a, n] + m
    assert (ell > 0).all()  # every returned triplet violates the margin
    assert (ell[policy == 1] < m).all()  # semi-hard: d_ap < d_an
    hardest = policy == 2
    nearest = torch.where(neg, dist, torch.inf)[a[hardest]].argmin(1)
    assert torch.equal(n[hardest], nearest)  # hardest: the nearest negative of the anchor
    assert (a < p).all()  # unordered pairs, lower index as anchor


def test_miner_before_the_first_update_is_random_hard():
    _, labels, sim = random_batch(32, 8, seed=4, clustered=0.7)
    sel = NSPAMiner()(sim, labels, epoch=9.5, generator=torch.Generator().manual_seed(0))
    st = sel.stats
    assert st["p_random_hard"] == 1.0 and st["drawn_random_hard"] == st["candidate_pairs"]
    assert st["triplets_random_hard"] == st["triplets"] > 0
    a, p, n = sel.triplets
    dist = sim_to_distance(sim, "euclidean")
    assert (dist[a, p] - dist[a, n] + 0.4 > 0).all()
    assert sel.thresholds["margin"].item() == pytest.approx(0.4)
    # after 50 updates half semi-hard, half hardest, no random-hard
    late = NSPAMiner()(sim, labels, epoch=600, generator=torch.Generator().manual_seed(0))
    assert late.stats["drawn_random_hard"] == 0 and late.stats["p_hardest"].item() == pytest.approx(0.5)


def test_policy_frequencies_match_the_probabilities():
    """Chi-square goodness of fit, seeded: with margin 2 (every negative violates) and clustered data
    every pair has candidates for every policy, so the per-triplet policy frequencies must follow P."""
    miner = NSPAMiner(margin=2.0)
    epoch = 60  # k = 6: P = (0.34, 0.60, 0.06)
    probs = miner.probabilities(epoch)
    gen = torch.Generator().manual_seed(2024)
    counts = torch.zeros(3)
    for rep in range(20):
        _, labels, sim = random_batch(64, 8, seed=rep, clustered=1.5)
        sel = miner(sim, labels, epoch=epoch, generator=gen)
        assert sel.stats["skipped_pairs"] == 0
        counts += torch.tensor(
            [float(sel.stats[f"triplets_{k}"]) for k in ("random_hard", "semi_hard", "hardest")]
        )
    total = counts.sum()
    assert total == 20 * 8 * (8 * 7 // 2)
    expected = total * torch.tensor(probs)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001
    # and a wrong probability vector is rejected by the same test
    wrong = total * torch.tensor([0.30, 0.64, 0.06])
    assert ((counts - wrong) ** 2 / wrong).sum().item() > 13.8


def test_batch_draw_uses_one_policy_per_call_and_memory_uses_ordered_pairs():
    _, labels, sim = random_batch(24, 6, seed=5, clustered=0.7)
    miner = NSPAMiner(margin=1.0, draw="batch", p_init=(0.4, 0.3, 0.3), update_every=10**9)
    seen = set()
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        st = miner(sim, labels, epoch=60, generator=gen).stats
        drawn = [int(st[f"drawn_{k}"]) for k in ("random_hard", "semi_hard", "hardest")]
        assert sorted(drawn)[:2] == [0, 0]
        seen.add(max(range(3), key=lambda i: drawn[i]))
    assert seen == {0, 1, 2}
    emb, labels, _ = random_batch(8, 2, seed=6)
    mem, mem_labels, _ = random_batch(20, 2, seed=7)
    sel = NSPAMiner(margin=1.0)(emb @ mem.T, labels, mem_labels, generator=torch.Generator().manual_seed(0))
    assert sel.stats["candidate_pairs"] == (labels[:, None] == mem_labels[None, :]).sum()
    assert sel.pos_mask.shape == (8, 20)


def test_generator_determinism_and_validation():
    _, labels, sim = random_batch(24, 6, seed=8, clustered=0.7)
    miner = NSPAMiner()
    a = miner(sim, labels, epoch=30, generator=torch.Generator().manual_seed(3)).triplets
    b = miner(sim, labels, epoch=30, generator=torch.Generator().manual_seed(3)).triplets
    c = miner(sim, labels, epoch=30, generator=torch.Generator().manual_seed(4)).triplets
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for bad in (dict(draw="anchor"), dict(pairs="all"), dict(on_empty="dummy"), dict(distance="l1")):
        with pytest.raises(ValueError):
            NSPAMiner(**bad)
