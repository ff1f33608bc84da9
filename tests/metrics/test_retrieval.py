"""RetrievalMetrics: hand-computed cases, brute-force parity, lone queries, query != gallery, DDP de-duplication."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddtas_lightning.metrics import RetrievalMetrics, compute_retrieval_metrics, deduplicate_by_index

from ._reference import brute_retrieval, unit_angles

BACKENDS = ["torch", "faiss"]
KNN_KEYS = ["R@1", "R@2", "R@4", "R@8", "MAP@R", "R-Precision", "num_queries", "num_lone_queries"]


def _assert_close(ours: dict, expected: dict, keys=KNN_KEYS, atol=1e-6):
    for key in keys:
        a, b = float(ours[key]), float(expected[key])
        if math.isnan(b):
            assert math.isnan(a), key
        else:
            assert a == pytest.approx(b, abs=atol), (key, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_query_equals_gallery(backend):
    # angles 0, 10, 25, 45, 100, 115 deg; labels A A B A B B. Neighbour orders, worked out by hand:
    #   q0 (A): 1 2 3 4 5 -> rel 1 0 1 0 0, R=2: R@1=1 R@2=1 RP=1/2 AP@R=1/2
    #   q1 (A): 0 2 3 4 5 -> rel 1 0 1 0 0, R=2: 1 1 1/2 1/2
    #   q2 (B): 1 3 0 4 5 -> rel 0 0 0 1 1, R=2: R@1=0 R@2=0 R@4=1 RP=0 AP@R=0
    #   q3 (A): 2 1 0 4 5 -> rel 0 1 1 0 0, R=2: R@1=0 R@2=1 RP=1/2 AP@R=(1/2)(1/2)=1/4
    #   q4 (B): 5 3 2 1 0 -> rel 1 0 1 0 0, R=2: 1 1 1/2 1/2
    #   q5 (B): 4 3 2 1 0 -> rel 1 0 1 0 0, R=2: 1 1 1/2 1/2
    emb = unit_angles([0, 10, 25, 45, 100, 115])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    metric = RetrievalMetrics(backend=backend, nmi=False)
    metric.update(emb, labels, torch.arange(6))
    out = metric.compute()
    expected = {
        "R@1": 4 / 6,
        "R@2": 5 / 6,
        "R@4": 1.0,
        "R@8": 1.0,
        "MAP@R": 2.25 / 6,
        "R-Precision": 2.5 / 6,
        "num_queries": 6,
        "num_lone_queries": 0,
    }
    _assert_close(out, expected)
    assert "NMI" not in out
    _assert_close(brute_retrieval(emb, labels), expected)  # the reference agrees with the hand computation


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_query_gallery_split_lone_and_duplicates(backend):
    # id: angle label role
    #  0:  0deg  A  gallery
    #  1: 20deg  B  query + gallery
    #  2: 20deg  B  gallery  (same embedding as 1, a different image: must be found by query 1)
    #  3: 90deg  C  gallery
    #  4:  8deg  B  query    -> neighbours 0, 1, 2 (1 and 2 tie: smaller index first), 3; rel 0 1 1 0, R=2
    #                           R@1=0 R@2=1 RP=1/2 AP@R=(1/2)(1/2)=1/4
    #  5: 50deg  D  query    -> lone (no D in the gallery): excluded and counted
    # query 1: neighbours 2 (sim 1), 0, 3 (itself excluded by index); rel 1 0 0, R=1: R@1=1 RP=1 AP@R=1
    emb = unit_angles([0, 20, 20, 90, 8, 50])
    emb[2] = emb[1]
    labels = torch.tensor([0, 1, 1, 2, 1, 3])
    is_query = torch.tensor([False, True, False, False, True, True])
    is_gallery = torch.tensor([True, True, True, True, False, False])
    out = compute_retrieval_metrics(
        emb, labels, ids=torch.arange(6), is_query=is_query, is_gallery=is_gallery, backend=backend, nmi=False
    )
    expected = {
        "R@1": 0.5,
        "R@2": 1.0,
        "R@4": 1.0,
        "R@8": 1.0,
        "MAP@R": 0.625,
        "R-Precision": 0.75,
        "num_queries": 3,
        "num_lone_queries": 1,
    }
    _assert_close(out, expected)
    _assert_close(brute_retrieval(emb, labels, None, is_query, is_gallery), expected)


def _clustered(n, d, num_classes, spread, gen):
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    centres = torch.randn(num_classes, d, generator=gen)
    emb = F.normalize(spread * centres[labels] + torch.randn(n, d, generator=gen), dim=1)
    return emb, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_brute_force(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    n = [120, 250, 333][seed]
    emb, labels = _clustered(n, 16, [7, 40, 150][seed], [0.0, 1.0, 3.0][seed], gen)
    recall_ks = (1, 2, 4, 8, 16)
    # query == gallery
    ours = compute_retrieval_metrics(emb, labels, backend=backend, nmi=False, recall_ks=recall_ks)
    ref = brute_retrieval(emb, labels, recall_ks=recall_ks)
    _assert_close(ours, ref, keys=[*ref])
    # random roles: disjoint, overlapping and gallery-only items, with lone queries
    roles = torch.randint(0, 3, (n,), generator=gen)
    is_query, is_gallery = roles != 1, roles != 0
    ours = compute_retrieval_metrics(
        emb,
        labels,
        is_query=is_query,
        is_gallery=is_gallery,
        backend=backend,
        nmi=False,
        recall_ks=recall_ks,
        chunk_size=17,
    )
    ref = brute_retrieval(emb, labels, None, is_query, is_gallery, recall_ks=recall_ks)
    _assert_close(ours, ref, keys=[*ref])


def test_duplicated_embeddings_of_different_images_tie_by_index():
    """Many images share an embedding: ranking among them is by dataset index, identical in both backends."""
    gen = torch.Generator().manual_seed(7)
    base = F.normalize(torch.randn(15, 8, generator=gen), dim=1)
    emb = base[torch.randint(0, 15, (200,), generator=gen)]
    labels = torch.randint(0, 12, (200,), generator=gen)
    ids = torch.randperm(200, generator=gen) * 3  # non-contiguous dataset indices
    ref = brute_retrieval(emb, labels, ids)
    for backend in BACKENDS:
        _assert_close(compute_retrieval_metrics(emb, labels, ids=ids, backend=backend, nmi=False), ref)


def test_ddp_padding_duplicates_are_removed_and_order_does_not_matter():
    gen = torch.Generator().manual_seed(3)
    emb, labels = _clustered(101, 12, 20, 1.5, gen)
    ids = torch.arange(101)
    single = RetrievalMetrics(nmi=False)
    single.update(emb, labels, ids)
    expected = single.compute()

    # two "ranks" with DistributedSampler-style interleaving and padding (repeats the first samples)
    order = torch.randperm(101, generator=gen)
    padded = torch.cat([order, order[:3]])  # 104 = 2 x 52
    ranks = [RetrievalMetrics(nmi=False) for _ in range(2)]
    for r, metric in enumerate(ranks):
        mine = padded[r::2]
        for batch in mine.split(10):
            metric.update(emb[batch], labels[batch], ids[batch])
    ranks[0].merge_state(ranks[1])  # what dist_reduce_fx="cat" does across processes
    merged = ranks[0].compute()
    assert set(merged) == set(expected)
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def test_deduplicate_by_index():
    ids = torch.tensor([5, 3, 5, 9, 3])
    keep = deduplicate_by_index(ids)
    assert keep.tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="different labels"):
        deduplicate_by_index(ids, labels=torch.tensor([0, 1, 2, 3, 1]))


def test_all_lone_gives_nan_and_no_gallery():
    emb = unit_angles([0, 30, 60])
    out = compute_retrieval_metrics(emb, torch.tensor([0, 1, 2]), nmi=False)
    assert math.isnan(out["R@1"]) and math.isnan(out["MAP@R"]) and math.isnan(out["R-Precision"])
    assert out["num_lone_queries"] == 3
    out = compute_retrieval_metrics(
        emb, torch.tensor([0, 0, 1]), is_gallery=torch.zeros(3, dtype=torch.bool), nmi=False
    )
    assert math.isnan(out["R@1"]) and out["num_lone_queries"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_recall_alone_equals_recall_with_the_other_metrics(backend):
    # without MAP@R / R-Precision no relevant rank is kept (depth 0): R@K must still see the best one
    gen = torch.Generator().manual_seed(3)
    emb, labels = _clustered(150, 16, 10, 1.0, gen)
    recall_ks = (1, 2, 4)
    alone = compute_retrieval_metrics(emb, labels, backend=backend, recall_ks=recall_ks, map_at_r=False,
                                      r_precision=False, nmi=False)
    ref = brute_retrieval(emb, labels, recall_ks=recall_ks)
    assert alone["R@1"] > 0
    _assert_close(alone, ref, keys=[f"R@{k}" for k in recall_ks])


def test_recall_k_beyond_gallery_size_and_selected_metrics():
    emb = unit_angles([0, 10, 20, 90])
    labels = torch.tensor([0, 1, 0, 1])
    out = compute_retrieval_metrics(
        emb, labels, recall_ks=(1, 100), map_at_r=False, r_precision=False, nmi=False
    )
    assert set(out) == {"R@1", "R@100", "num_queries", "num_lone_queries"}
    # K = 100 > gallery size: every non-lone query finds its class somewhere in the (whole) gallery
    assert out["R@100"] == 1.0
    assert out["R@1"] == pytest.approx(brute_retrieval(emb, labels, recall_ks=(1,))["R@1"])


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_outputs_and_validation():
    metric = RetrievalMetrics(recall_ks=(1, 4), nmi=True)
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    gen = torch.Generator().manual_seed(0)
    emb, labels = _clustered(60, 8, 6, 4.0, gen)
    metric.update(emb[:30], labels[:30], torch.arange(30))
    metric.update(emb[30:], labels[30:], torch.arange(30, 60))
    out = metric.compute()
    assert list(out) == ["R@1", "R@4", "MAP@R", "R-Precision", "NMI", "num_queries", "num_lone_queries"]
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())
    assert 0.0 <= float(out["NMI"]) <= 1.0
    with pytest.raises(ValueError, match="labels"):
        metric.update(emb, labels[:3], torch.arange(60))
    with pytest.raises(ValueError, match="backend"):
        RetrievalMetrics(backend="annoy")
    with pytest.raises(ValueError, match="recall_ks"):
        RetrievalMetrics(recall_ks=(0, 1))
    with pytest.raises(ValueError, match="no query"):
        compute_retrieval_metrics(emb, labels, is_query=torch.zeros(60, dtype=torch.bool))


def test_nmi_is_seeded_and_reproducible():
    gen = torch.Generator().manual_seed(11)
    # overlapping clusters: the k-means result depends on the seed
    emb, labels = _clustered(300, 16, 30, 0.7, gen)
    a = compute_retrieval_metrics(emb, labels, nmi_seed=0, recall_ks=(), map_at_r=False, r_precision=False)
    b = compute_retrieval_metrics(emb, labels, nmi_seed=0, recall_ks=(), map_at_r=False, r_precision=False)
    assert a["NMI"] == b["NMI"]


@pytest.mark.parametrize("list_depth", [1, 32])
def test_backends_identical_with_ties_duplicates_and_deep_recall(monkeypatch, list_depth):
    """Heavy exact ties, K up to 1000 > N: torch (list + similarity-block counting) == faiss == brute force."""
    import ddtas_lightning.metrics.neighbors as neighbors_module
    import ddtas_lightning.metrics.ranks as ranks_module

    monkeypatch.setattr(neighbors_module, "_SIM_BLOCK_ELEMENTS", 1000)  # several similarity blocks per batch
    # list_depth=1 sends almost every R@K through the deep (similarity-row counting) path of both backends
    monkeypatch.setattr(ranks_module, "_LIST_DEPTH", list_depth)
    ks = (1, 3, 10, 100, 1000)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(20, 200, (1,), generator=gen))
        d = int(torch.randint(2, 24, (1,), generator=gen))
        base = F.normalize(torch.randn(max(3, n // 4), d, generator=gen), dim=1)
        emb = base[torch.randint(0, len(base), (n,), generator=gen)]  # many duplicated embeddings
        labels = torch.randint(0, max(2, n // 5), (n,), generator=gen)
        ids = torch.randperm(n, generator=gen)
        roles = torch.randint(0, 3, (n,), generator=gen)
        kwargs = dict(ids=ids, recall_ks=ks, nmi=False, normalize=False)
        for split in (False, True):
            if split:
                kwargs.update(is_query=roles != 1, is_gallery=roles != 0)
            results = [
                compute_retrieval_metrics(emb, labels, backend=b, chunk_size=c, **kwargs)
                for b, c in (("torch", None), ("torch", 7), ("faiss", None), ("faiss", 5))
            ]
            for other in results[1:]:
                assert other == results[0], (seed, split)
            order = torch.argsort(ids)
            expected = brute_retrieval(
                emb[order],
                labels[order],
                ids[order],
                None if not split else (roles != 1)[order],
                None if not split else (roles != 0)[order],
                recall_ks=ks,
            )
            _assert_close(results[0], expected, keys=[f"R@{k}" for k in ks] + ["MAP@R", "R-Precision"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_n_tensor_is_ever_allocated(monkeypatch, backend):
    """Record every tensor any aten op produces: the largest stays far below N x N (bounded by the chunk budget)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import ddtas_lightning.metrics.neighbors as neighbors_module

    monkeypatch.setattr(neighbors_module, "_SIM_BLOCK_ELEMENTS", 2**17)  # torch: 43-row similarity blocks

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    gen = torch.Generator().manual_seed(0)
    n, d = 3000, 16
    emb, labels = _clustered(n, d, 600, 0.4, gen)
    with LargestOutput():
        out = compute_retrieval_metrics(emb, labels, recall_ks=(1, 10, 100), backend=backend, nmi=False)
    assert 0 < out["R@1"] <= 1
    assert LargestOutput.largest < n * n // 16, LargestOutput.largest
