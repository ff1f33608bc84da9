"""NMI formula (against scikit-learn and a from-the-definition reference) and faiss k-means assignments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddtas_lightning.metrics import clustering_nmi, kmeans_assign, normalized_mutual_info

from ._reference import brute_nmi

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(8))
def test_nmi_matches_sklearn_and_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    u = rng.integers(-5, int(rng.integers(1, 400)), n) * 7  # negative, non-contiguous labels
    v = rng.integers(0, int(rng.integers(1, 400)), n)
    if seed % 2:  # correlated assignments
        v = np.where(rng.random(n) < 0.7, u, v)
    ours = normalized_mutual_info(torch.from_numpy(u), torch.from_numpy(v))
    assert ours == pytest.approx(sklearn_metrics.normalized_mutual_info_score(u, v), abs=1e-12)
    assert ours == pytest.approx(brute_nmi(u, v), abs=1e-10)


def test_nmi_hand_computed_and_edge_cases():
    # U = [0 0 1 1], V = [0 0 0 1]: n_ij = {(0,0): 2, (1,0): 1, (1,1): 1}, a = (2, 2), b = (3, 1)
    # I = 2/4 log(4*2/6) + 1/4 log(4/6) + 1/4 log(4/2); H(U) = log 2; H(V) = -(3/4 log 3/4 + 1/4 log 1/4)
    mi = 0.5 * np.log(8 / 6) + 0.25 * np.log(4 / 6) + 0.25 * np.log(2)
    h_u, h_v = np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(
        mi / ((h_u + h_v) / 2), abs=1e-15
    )
    assert normalized_mutual_info([0, 0, 1, 1], [5, 5, 2, 2]) == pytest.approx(1.0)  # permutation invariant
    assert normalized_mutual_info([3, 3, 3], [1, 1, 1]) == 1.0  # both a single group
    assert normalized_mutual_info([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert normalized_mutual_info([0, 1, 2, 3], [0, 0, 0, 0]) == 0.0
    assert normalized_mutual_info([], []) == 1.0
    for u, v in ([[0, 0, 1, 1], [0, 0, 0, 1]], [[0, 0, 0, 0], [0, 1, 2, 3]], [[3, 3, 3], [1, 1, 1]]):
        assert normalized_mutual_info(u, v) == pytest.approx(
            sklearn_metrics.normalized_mutual_info_score(u, v)
        )
    with pytest.raises(ValueError):
        normalized_mutual_info([0, 1], [0])


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 32, generator=gen), dim=1) * 10
    labels = torch.arange(10).repeat_interleave(30)
    x = centres[labels] + 0.01 * torch.randn(300, 32, generator=gen)
    assign = kmeans_assign(x, 10, seed=3)
    assert assign.dtype == torch.int64 and assign.shape == (300,)
    # Lloyd from a random init may merge two clusters (a local minimum), but never splits a tight one much
    nmi = normalized_mutual_info(labels, assign)
    assert nmi > 0.85
    assert clustering_nmi(x, labels, seed=3) == nmi
    two = torch.arange(2).repeat_interleave(50)
    x2 = torch.stack([-torch.ones(8), torch.ones(8)])[two] + 0.01 * torch.randn(100, 8, generator=gen)
    assert normalized_mutual_info(two, kmeans_assign(x2, 2, seed=0)) == pytest.approx(1.0)
    noisy = torch.randn(200, 8, generator=gen)
    assert torch.equal(kmeans_assign(noisy, 20, seed=1), kmeans_assign(noisy, 20, seed=1))
    assert kmeans_assign(noisy, 1).eq(0).all()
    with pytest.raises(ValueError):
        kmeans_assign(noisy, 201)
