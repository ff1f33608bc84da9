"""NSPA's cluster statistics (spec docs/papers/nspa.md §2.2) against a slow per-class loop written from the
definitions, on hand-made and random inputs, plus the Metric wrapper (DDP padding de-duplicated)."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from ddtas_lightning.metrics import cluster_stats as cs
from ddtas_lightning.metrics.cluster_stats import ClusterStatistics, cluster_statistics


def reference(x: torch.Tensor, y: torch.Tensor, margin: float = 0.2) -> dict[str, float]:
    """One Python loop per class / per pair, in float64, straight from the definitions."""
    pts = x.double().tolist()
    labels = y.tolist()
    classes = sorted(set(labels))

    def d(a, b):
        return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))

    members = {c: [pts[i] for i in range(len(pts)) if labels[i] == c] for c in classes}
    others = {c: [pts[i] for i in range(len(pts)) if labels[i] != c] for c in classes}
    cent = {c: [sum(col) / len(members[c]) for col in zip(*members[c])] for c in classes}
    radius = {c: max(d(cent[c], p) for p in members[c]) for c in classes}
    pct, pct_m, closest, diam = [], [], [], []
    for c in classes:
        n = len(members[c])
        s = sum(1 for p in others[c] if d(cent[c], p) <= radius[c])
        s_m = sum(1 for p in others[c] if d(cent[c], p) <= radius[c] + margin)
        pct.append(s / (s + n))
        pct_m.append(s_m / (s_m + n))
        closest.append(min(d(cent[c], p) for p in others[c]) if others[c] else math.nan)
        if n >= 2:
            diam.append(max(d(p, q) for p, q in itertools.combinations(members[c], 2)))
    all_d = [d(pts[i], pts[j]) for i, j in itertools.combinations(range(len(pts)), 2)]
    pos_d = [
        d(pts[i], pts[j]) for i, j in itertools.combinations(range(len(pts)), 2) if labels[i] == labels[j]
    ]
    avg_all = statistics.fmean(all_d)
    out = {
        "avgCentroidDistance": statistics.fmean(
            d(cent[a], cent[b]) for a, b in itertools.combinations(classes, 2)
        ),
        "avgClosestNegatives": statistics.fmean(closest),
        "avgClusterRadius": statistics.fmean(radius.values()),
        "avgPctOfNegativesInCluster": statistics.fmean(pct),
        "avgPctOfNegativesInClusterWithMargin": statistics.fmean(pct_m),
        "avgPositiveDistance": statistics.fmean(pos_d),
        "stdPositiveDistance": statistics.pstdev(pos_d),
        "avgDistanceOfFurthestPositives": statistics.fmean(diam),
        "avgDistanceBetweenElements": avg_all,
        "stdDistanceBetweenElements": statistics.pstdev(all_d),
    }
    for name in cs.NORMALISED:
        out[f"norm{name}"] = out[f"avg{name}"] / avg_all
    return out


def assert_matches(got: dict, expected: dict, tol: float = 1e-9) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


def test_hand_made_two_clusters_on_a_line():
    # class 0 at 0 and 2 (centroid 1, radius 1), class 1 at 1.5 and 5.5 (centroid 3.5, radius 2)
    x = torch.tensor([[0.0], [2.0], [1.5], [5.5]])
    y = torch.tensor([0, 0, 1, 1])
    got = cluster_statistics(x, y, margin=0.2)
    assert got["avgCentroidDistance"] == pytest.approx(2.5)
    assert got["avgClusterRadius"] == pytest.approx(1.5)
    # class 0's ball [0, 2] holds the negative 1.5; class 1's ball [1.5, 5.5] holds the negative 2
    assert got["avgPctOfNegativesInCluster"] == pytest.approx(1 / 3)
    # with margin 0.2: class 1's ball [1.3, 5.7] still holds only 2 (0 is 3.5 away, radius + margin 2.2)
    assert got["avgPctOfNegativesInClusterWithMargin"] == pytest.approx(1 / 3)
    assert got["avgClosestNegatives"] == pytest.approx((0.5 + 1.5) / 2)
    assert got["avgPositiveDistance"] == pytest.approx(3.0)  # pairs: 2 and 4
    assert got["stdPositiveDistance"] == pytest.approx(1.0)
    assert got["avgDistanceOfFurthestPositives"] == pytest.approx(3.0)
    all_d = [2.0, 1.5, 5.5, 0.5, 3.5, 4.0]
    assert got["avgDistanceBetweenElements"] == pytest.approx(sum(all_d) / 6)
    assert got["normClusterRadius"] == pytest.approx(1.5 / (sum(all_d) / 6))
    assert_matches(got, reference(x, y))


def test_separated_clusters_have_no_negatives_inside():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = torch.arange(3).repeat_interleave(20)
    x = centres[y] + 0.1 * torch.randn(60, 2, generator=g)
    got = cluster_statistics(x, y)
    assert got["avgPctOfNegativesInCluster"] == 0.0 and got["avgPctOfNegativesInClusterWithMargin"] == 0.0
    assert got["avgCentroidDistance"] == pytest.approx((10 + 10 + 10 * math.sqrt(2)) / 3, rel=1e-2)
    # the same points in one class each would overlap completely
    mixed = cluster_statistics(x, torch.arange(60) % 3)
    assert mixed["avgPctOfNegativesInCluster"] > 0.6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sizes", [(6, 6, 6), (5, 9, 2, 7), (1, 4, 3)])
def test_matches_the_reference_on_random_inputs(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c * 3 + 1) for c, n in enumerate(sizes)])  # non-contiguous class ids
    perm = torch.randperm(len(y), generator=g)
    y = y[perm]
    x = torch.randn(len(y), 5, generator=g) + 0.8 * torch.randn(len(sizes) * 3 + 2, 5, generator=g)[y]
    assert_matches(cluster_statistics(x, y, margin=0.3), reference(x, y, margin=0.3))


def test_blocked_computation_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(7)
    y = torch.arange(40) % 5
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    whole = cluster_statistics(x, y)
    monkeypatch.setattr(cs, "_BLOCK_ELEMENTS", 37)  # blocks of 1 row / 7 points
    assert_matches(cluster_statistics(x, y), whole, tol=1e-12)
    assert_matches(whole, reference(x, y))


def test_edge_cases():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    one_class = cluster_statistics(x, torch.zeros(4, dtype=torch.long))
    assert math.isnan(one_class["avgCentroidDistance"]) and one_class["avgPctOfNegativesInCluster"] == 0.0
    singletons = cluster_statistics(x, torch.arange(4))
    assert math.isnan(singletons["avgPositiveDistance"]) and singletons["avgClusterRadius"] == 0.0
    with pytest.raises(ValueError):
        cluster_statistics(x, torch.zeros(3, dtype=torch.long))


def test_metric_deduplicates_padding_and_matches_the_function():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(30) % 3
    x = torch.randn(30, 4, generator=g)
    metric = ClusterStatistics(margin=0.2)
    idx = torch.arange(30)
    metric.update(x[:16], y[:16], idx[:16])
    metric.update(x[16:], y[16:], idx[16:])
    metric.update(x[:2], y[:2], idx[:2])  # DDP pads the last shard with repeats
    got = {k: float(v) for k, v in metric.compute().items()}
    assert_matches(got, cluster_statistics(x, y), tol=1e-6)
    metric.reset()
    with pytest.warns(UserWarning), pytest.raises(ValueError):  # torchmetrics warns first
        metric.compute()
