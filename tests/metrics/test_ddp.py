"""RetrievalMetrics under real torch.distributed (2 CPU processes, gloo) equals the single-process result.

Marked slow (~25 s on 2 cores: each spawned process imports torch, torchmetrics and faiss); the fast suite covers the
same merge through ``Metric.merge_state`` in test_retrieval.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ddtas_lightning.metrics import RetrievalMetrics
from tests.conftest import free_port

N, WORLD = 103, 2


def _data():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 25, (N,), generator=gen)
    emb = F.normalize(torch.randn(25, 16, generator=gen)[labels] + torch.randn(N, 16, generator=gen), dim=1)
    roles = torch.randint(0, 3, (N,), generator=gen)
    return emb, labels, roles != 1, roles != 0


def _shard(rank: int) -> torch.Tensor:
    """DistributedSampler(shuffle=False, drop_last=False): pad by repeating the first items, then interleave."""
    order = torch.arange(N)
    total = -(-N // WORLD) * WORLD
    padded = torch.cat([order, order[: total - N]])
    return padded[rank::WORLD]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        emb, labels, is_query, is_gallery = _data()
        metric = RetrievalMetrics(nmi=True)
        for batch in _shard(rank).split(8):
            metric.update(emb[batch], labels[batch], batch, is_query[batch], is_gallery[batch])
        result = metric.compute()
        torch.save({k: v.clone() for k, v in result.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_process_gloo_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    emb, labels, is_query, is_gallery = _data()
    single = RetrievalMetrics(nmi=True)
    single.update(emb, labels, torch.arange(N), is_query, is_gallery)
    expected = single.compute()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (rank, key, got[key], expected[key])
