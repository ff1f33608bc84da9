"""A PML loss with parameters (Proxy-Anchor's proxies, in their own optimizer group) under DDP: 2 gloo
processes x B/2 follow the single process x B, proxies included (the comparison of
tests/test_ddp_equivalence.py, reusing its CLI runner, float64 tolerances and per-rank dumps)."""

from __future__ import annotations

import pytest
import torch

from tests.test_ddp_equivalence import ATOL, RTOL, assert_close, train_cli

PROXY = ["threshold_policy=static", "loss=pml", "loss.name=ProxyAnchorLoss", "loss.num_classes=5", "miner=none",
         "+optimizer.loss_lr=0.05"]


def loss_state(run) -> dict:
    state = torch.load(run.dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("loss_fn.")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_proxy_anchor_two_ranks_train_like_one_process(tmp_path):
    single = train_cli(tmp_path, 1, PROXY)
    ddp = train_cli(tmp_path, 2, PROXY)
    one, ranks = single.rank(0), [ddp.rank(r) for r in range(2)]
    assert len(one["steps"]) == 4 and all(len(r["steps"]) == 4 for r in ranks)
    for s in range(4):
        assert ranks[0]["steps"][s]["loss"] == ranks[1]["steps"][s]["loss"], f"step {s}: ranks' losses differ"
        assert_close(ranks[0]["steps"][s]["loss"], one["steps"][s]["loss"], f"step {s}: loss", RTOL)
    for k, v in one["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(ranks[0]["model"][k], v, rtol=RTOL, atol=ATOL)
    # the proxies (and the class-slot map) are identical across the two set-ups
    mine, theirs = loss_state(ddp), loss_state(single)
    assert mine.keys() == theirs.keys() == {"loss_fn.class_ids", "loss_fn.loss.proxies"}
    assert torch.equal(mine["loss_fn.class_ids"], theirs["loss_fn.class_ids"])
    torch.testing.assert_close(mine["loss_fn.loss.proxies"], theirs["loss_fn.loss.proxies"], rtol=RTOL, atol=ATOL)
