"""Parity with pytorch-metric-learning's AccuracyCalculator (k="max_bin_count"), PML being the numerical oracle.

PML's "precision_at_1" is our R@1; its R (and lone-query rule) is ours when queries are either all inside the
reference (ref_includes_query=True) or all outside it.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from ddtas_lightning.metrics import compute_retrieval_metrics

accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")

logging.getLogger("PML").setLevel(logging.ERROR)
PML_TO_OURS = {"precision_at_1": "R@1", "r_precision": "R-Precision", "mean_average_precision_at_r": "MAP@R"}


def _data(kind: str, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d = 32
    num_classes = max(2, n // 6)  # SOP-like: few images per class, some singletons -> lone queries
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    spread = {"random": 0.0, "clustered": 2.0}[kind]
    centres = torch.randn(num_classes, d, generator=gen)
    emb = F.normalize(spread * centres[labels] + torch.randn(n, d, generator=gen), dim=1)
    return emb, labels


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("n", [200, 1000, 2500])
@pytest.mark.parametrize("mode", ["query_is_gallery", "disjoint", "queries_inside_gallery"])
def test_knn_metrics_match_pml(kind, n, mode):
    emb, labels = _data(kind, n, seed=n)
    calc = accuracy_calculator.AccuracyCalculator(
        include=tuple(PML_TO_OURS), k="max_bin_count", device=torch.device("cpu")
    )
    m = n // 3
    ids = torch.arange(n)
    if mode == "query_is_gallery":
        pml = calc.get_accuracy(emb, labels)
        is_query = is_gallery = None
    elif mode == "disjoint":  # first m items are queries, the rest the gallery
        pml = calc.get_accuracy(emb[:m], labels[:m], emb[m:], labels[m:], ref_includes_query=False)
        is_query, is_gallery = ids < m, ids >= m
    else:  # first m items are queries, every item is in the gallery
        pml = calc.get_accuracy(emb[:m], labels[:m], emb, labels, ref_includes_query=True)
        is_query, is_gallery = ids < m, None
    for backend in ("torch", "faiss"):
        ours = compute_retrieval_metrics(
            emb,
            labels,
            ids=ids,
            is_query=is_query,
            is_gallery=is_gallery,
            backend=backend,
            nmi=False,
            normalize=False,
        )
        for pml_key, key in PML_TO_OURS.items():
            assert ours[key] == pytest.approx(pml[pml_key], abs=1e-6), (backend, key)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_nmi_matches_pml_with_the_same_kmeans_settings(kind):
    emb, labels = _data(kind, 600, seed=5)
    calc = accuracy_calculator.AccuracyCalculator(include=("NMI",), device=torch.device("cpu"))
    pml = calc.get_accuracy(emb, labels)["NMI"]
    # PML runs faiss.Kmeans(niter=20) with faiss' default seed 1234
    ours = compute_retrieval_metrics(
        emb,
        labels,
        recall_ks=(),
        map_at_r=False,
        r_precision=False,
        nmi_seed=1234,
        nmi_niter=20,
        normalize=False,
    )["NMI"]
    assert ours == pytest.approx(pml, abs=1e-6)
