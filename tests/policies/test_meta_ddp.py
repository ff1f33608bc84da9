"""Under DDP every rank must end the step with the same lambda: the meta gradient is averaged."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.policies import MetaThreshold
from tests.policies.problems import LOSSES, make_batch, make_model


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss_fn, miner = LOSSES["soft_contrastive"](), AllPairsMiner()
        train = make_batch(0)
        meta = make_batch(10 + rank)  # each rank draws its own meta batch
        train.meta_images, train.meta_labels = meta.meta_images, meta.meta_labels
        policy = MetaThreshold(init=0.5, mode="exact", inner_lr=0.1, min=0.0, max=1.0).double()
        out = policy.step(make_model(0), loss_fn, miner, train)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the same step without a process group: this rank's own gradient
    local = MetaThreshold(init=0.5, mode="exact", inner_lr=0.1, min=0.0, max=1.0).double()
    local_out = local.step(make_model(0), loss_fn, miner, train)
    torch.save(
        {"lam": policy.lam, "grad": out.logs["meta/grad_lambda"], "local_grad": local_out.logs["meta/grad_lambda"]},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_lambda_gradient_is_averaged_over_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["local_grad"] != r1["local_grad"]  # the ranks really saw different meta batches
    mean = (r0["local_grad"] + r1["local_grad"]) / 2
    torch.testing.assert_close(r0["grad"], mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(r1["grad"], mean, rtol=1e-12, atol=0)
    assert torch.equal(r0["lam"], r1["lam"]) and float(r0["lam"]) != 0.5
