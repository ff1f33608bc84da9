"""Per-class R@1 and MAP@R (evaluate's metrics.json) against the definitions, query by query."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.metrics.retrieval import compute_retrieval_metrics, per_class_metrics, per_query_metrics
from tests.metrics._reference import brute_retrieval


def _random_set(seed: int, n: int = 60, classes: int = 7, dim: int = 4, duplicates: bool = True):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    if duplicates:  # exact ties between different images must be ranked by dataset index
        emb[5] = emb[3]
        emb[9] = emb[3]
    return emb, labels


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_matches_the_definition_per_class(backend, seed):
    emb, labels = _random_set(seed)
    g = torch.Generator().manual_seed(100 + seed)
    is_query = torch.rand(len(labels), generator=g) < 0.7
    is_gallery = torch.rand(len(labels), generator=g) < 0.8
    per_class = per_class_metrics(per_query_metrics(emb, labels, is_query=is_query, is_gallery=is_gallery,
                                                    backend=backend))
    for c in labels.unique().tolist():
        ref = brute_retrieval(emb, labels, is_query=is_query & (labels == c), is_gallery=is_gallery,
                              recall_ks=(1,))
        num_eval = ref["num_queries"] - ref["num_lone_queries"]
        if num_eval == 0:
            assert c not in per_class
            continue
        assert per_class[c]["num_queries"] == num_eval
        assert per_class[c]["R@1"] == pytest.approx(ref["R@1"], abs=1e-12)
        assert per_class[c]["MAP@R"] == pytest.approx(ref["MAP@R"], abs=1e-12)


def test_per_query_means_are_the_aggregate_metrics():
    emb, labels = _random_set(3, n=200, classes=20, dim=8)
    ids = torch.arange(len(labels)).flip(0)  # any order of dataset indices
    per_query = per_query_metrics(emb, labels, ids=ids)
    agg = compute_retrieval_metrics(emb, labels, ids=ids, recall_ks=(1,), nmi=False)
    assert len(per_query["R@1"]) == agg["num_queries"] - agg["num_lone_queries"]
    assert float(per_query["R@1"].mean()) == pytest.approx(agg["R@1"], abs=1e-12)
    assert float(per_query["MAP@R"].mean()) == pytest.approx(agg["MAP@R"], abs=1e-12)
    assert torch.equal(per_query["ids"], torch.sort(ids).values)  # by increasing dataset index


def test_hand_made_class_scores():
    # 1-D angles: class 0 at 0, 10 deg and class 1 at 5 deg (between them), 90 deg
    from tests.metrics._reference import unit_angles

    emb = unit_angles([0.0, 10.0, 5.0, 90.0])
    labels = torch.tensor([0, 0, 1, 1])
    per_class = per_class_metrics(per_query_metrics(emb, labels))
    # every class-0 query finds the class-1 item at 5 deg first: R@1 = 0, AP@R = 0
    assert per_class[0] == {"num_queries": 2.0, "R@1": 0.0, "MAP@R": 0.0}
    # 5 deg's nearest is 0 deg or 10 deg (class 0): miss; 90 deg's nearest is 10 deg: miss
    assert per_class[1] == {"num_queries": 2.0, "R@1": 0.0, "MAP@R": 0.0}
    labels = torch.tensor([0, 0, 0, 1])  # 90 deg is now a lone query
    per_class = per_class_metrics(per_query_metrics(emb, labels))
    assert set(per_class) == {0}
    assert per_class[0]["R@1"] == 1.0
