"""Exact k-NN: brute-force parity, tie-break, self-exclusion by index, clamping, backend identity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddtas_lightning.metrics import KNNIndex, knn

from ._reference import brute_knn, pair_scores, unit_angles

BACKENDS = ["torch", "faiss"]


def _unit(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen), dim=1)


def _with_duplicates(n, d, num_distinct, gen):
    base = _unit(num_distinct, d, gen)
    return base[torch.randint(0, num_distinct, (n,), generator=gen)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_ties_and_self_exclusion(backend):
    # reference: 0 at 0deg, 1 and 2 both at 30deg (identical vectors), 3 at 0deg (a duplicate of 0), 4 at 90deg
    ref = unit_angles([0, 30, 30, 0, 90])
    ref[3] = ref[0]
    ref[2] = ref[1]
    query = torch.stack([ref[0], ref[1], unit_angles([60])[0]])
    sims, idx = knn(query, ref, 3, backend=backend)
    # exact ties -> smaller reference index first
    assert idx.tolist() == [[0, 3, 1], [1, 2, 0], [1, 2, 4]]
    # self-exclusion by id: query 0 is reference item 0 (id 10), query 1 is reference item 2 (id 12);
    # their duplicates (items 3 and 1) must still be found, and come first.
    ref_ids = torch.tensor([10, 11, 12, 13, 14])
    q_ids = torch.tensor([10, 12, 99])
    sims, idx = knn(query, ref, 3, backend=backend, query_ids=q_ids, reference_ids=ref_ids)
    assert idx.tolist() == [[3, 1, 2], [1, 0, 3], [1, 2, 4]]
    cos30 = math.cos(math.pi / 6)
    torch.testing.assert_close(sims[0], torch.tensor([1.0, cos30, cos30]), atol=1e-6, rtol=0)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_random_matches_brute_force(backend, chunk_size):
    gen = torch.Generator().manual_seed(0)
    ref, query = _unit(157, 24, gen), _unit(41, 24, gen)
    for k in (1, 5, 40):
        _, idx = knn(query, ref, k, backend=backend, chunk_size=chunk_size)
        assert torch.equal(idx, brute_knn(query, ref, k))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_backends_identical_on_heavy_duplicates_and_ties(chunk_size):
    """Many exact duplicates (so many exact ties at the k-th position): both backends == brute force."""
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        n, q = int(torch.randint(5, 250, (1,), generator=gen)), int(torch.randint(1, 60, (1,), generator=gen))
        d = int(torch.randint(2, 40, (1,), generator=gen))
        base = _unit(max(2, n // 6), d, gen)
        ref = base[torch.randint(0, len(base), (n,), generator=gen)]
        query = base[torch.randint(0, len(base), (q,), generator=gen)]
        ref_ids = torch.randperm(n, generator=gen) + 100
        q_ids = torch.randint(90, n + 110, (q,), generator=gen)  # some in the reference, some not
        for k in (1, 4, n - 1, n, n + 3, 1000):  # k > N: clamped to N, padded where own id is excluded
            if k < 1:
                continue
            expected = brute_knn(query, ref, k, q_ids, ref_ids)
            results = [
                knn(query, ref, k, backend=b, query_ids=q_ids, reference_ids=ref_ids, chunk_size=chunk_size)
                for b in BACKENDS
            ]
            for _sims, idx in results:
                assert torch.equal(idx, expected), (seed, k)
            assert torch.equal(results[0][0], results[1][0])  # similarities identical too


def test_backends_identical_on_near_ties():
    """Similarities 1e-8 apart (below float32 GEMM noise): both backends follow the float64 order."""
    gen = torch.Generator().manual_seed(3)
    d = 64
    ref = _unit(300, d, gen)
    query = _unit(20, d, gen)
    # make many reference vectors near-copies of the first 10 (perturbation ~1e-7 before normalisation)
    ref[10:200] = F.normalize(
        ref[torch.arange(10, 200) % 10] + 1e-7 * torch.randn(190, d, generator=gen), dim=1
    )
    query[:10] = ref[:10]
    expected = brute_knn(query, ref, 25)
    for backend in BACKENDS:
        _, idx = knn(query, ref, 25, backend=backend)
        assert torch.equal(idx, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_is_clamped_and_rows_padded(backend):
    gen = torch.Generator().manual_seed(1)
    ref = _unit(6, 5, gen)
    sims, idx = knn(ref, ref, 10, backend=backend, query_ids=torch.arange(6), reference_ids=torch.arange(6))
    assert idx.shape == (6, 6) and sims.shape == (6, 6)
    # every row lost its own item: the last column is padding
    assert (idx[:, -1] == -1).all() and torch.isinf(sims[:, -1]).all() and (sims[:, -1] < 0).all()
    for i in range(6):
        assert sorted(idx[i, :-1].tolist()) == [j for j in range(6) if j != i]
    # without ids nothing is excluded: k = N returns a permutation
    _, idx = knn(ref, ref, 6, backend=backend)
    assert all(sorted(row) == list(range(6)) for row in idx.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_values(backend):
    gen = torch.Generator().manual_seed(2)
    ref, query = _unit(50, 8, gen).double(), _unit(9, 8, gen).double()
    sims, idx = knn(query, ref, 4, backend=backend)
    assert sims.dtype == torch.float32
    expected = pair_scores(query.float(), ref.float()).gather(1, idx).float()
    assert torch.equal(sims, expected)
    sims16, idx16 = knn(query.half(), ref.half(), 4, backend=backend)
    assert sims16.dtype == torch.float32 and idx16.shape == (9, 4)


def test_empty_queries_and_reuse_of_index():
    gen = torch.Generator().manual_seed(4)
    ref = _unit(30, 6, gen)
    for backend in BACKENDS:
        index = KNNIndex(ref, backend=backend, reference_ids=torch.arange(30))
        sims, idx = index.search(torch.empty(0, 6), 3)
        assert sims.shape == (0, 3) and idx.shape == (0, 3)
        a = index.search(ref[:5], 3, query_ids=torch.arange(5))[1]
        b = index.search(ref[:5], 3, query_ids=torch.arange(5))[1]
        assert torch.equal(a, b) and not (a == torch.arange(5)[:, None]).any()


def test_invalid_arguments():
    ref = torch.eye(4)
    with pytest.raises(ValueError, match="backend"):
        knn(ref, ref, 1, backend="annoy")
    with pytest.raises(ValueError, match="k must be"):
        knn(ref, ref, 0)
    with pytest.raises(ValueError, match="dim"):
        knn(torch.ones(2, 3), ref, 1)
    with pytest.raises(ValueError, match="unique"):
        knn(ref, ref, 1, query_ids=torch.arange(4), reference_ids=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="reference_ids"):
        knn(ref, ref, 1, query_ids=torch.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        knn(torch.full((1, 4), math.nan), ref, 1)
    with pytest.raises(ValueError, match="empty"):
        knn(ref, torch.empty(0, 4), 1)
    with pytest.raises(ValueError, match="chunk_size"):
        knn(ref, ref, 1, chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(backend):  # pragma: no cover - runs on GPU machines only
    gen = torch.Generator().manual_seed(5)
    ref = _with_duplicates(3000, 64, 1000, gen)
    query = ref[:500].clone()
    ids = torch.arange(3000)
    cpu = knn(query, ref, 12, backend=backend, query_ids=ids[:500], reference_ids=ids)
    gpu = knn(
        query.cuda(), ref.cuda(), 12, backend=backend, query_ids=ids[:500].cuda(), reference_ids=ids.cuda()
    )
    assert gpu[1].is_cuda
    assert torch.equal(gpu[1].cpu(), cpu[1])


def test_auto_chunk_bounds_the_similarity_block(monkeypatch):
    """With the block budget set to 50 x N elements, no torch block has more than 50 query rows."""
    from ddtas_lightning.metrics import neighbors as knn_module

    gen = torch.Generator().manual_seed(6)
    ref = _with_duplicates(400, 12, 150, gen)
    monkeypatch.setattr(knn_module, "_SIM_BLOCK_ELEMENTS", 50 * 400)
    rows_seen = []
    original = knn_module.KNNIndex._search_chunk_torch

    def spy(self, q, *args):
        rows_seen.append(len(q))
        yield from original(self, q, *args)

    monkeypatch.setattr(knn_module.KNNIndex, "_search_chunk_torch", spy)
    ids = torch.arange(400)
    _, idx = knn(ref, ref, 9, query_ids=ids, reference_ids=ids)
    assert max(rows_seen) == 50 and sum(rows_seen) == 400
    assert torch.equal(idx, brute_knn(ref, ref, 9, ids, ids))


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_setting_keeps_results_exact(precision):
    """Under TF32/bf16 matmul settings the candidate band widens; the final ranking is still the exact one."""
    gen = torch.Generator().manual_seed(8)
    ref = _with_duplicates(300, 32, 120, gen)
    query = _unit(40, 32, gen)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        results = [knn(query, ref, 10, backend=b)[1] for b in BACKENDS]
    finally:
        torch.set_float32_matmul_precision(previous)
    expected = brute_knn(query, ref, 10)
    assert all(torch.equal(idx, expected) for idx in results)
