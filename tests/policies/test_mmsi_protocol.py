"""threshold_policy.static_steps (MMSI's protocol: a static warm-up, then meta pair weights)."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.miners.none import AllPairsMiner
from ddtas_lightning.policies import MMSI, MetaPairWeights
from tests.policies.problems import LOSSES
from tests.policies.test_mmsi import problem


@pytest.mark.parametrize("kind", ["pair_weight", "mmsi"])
def test_static_steps_are_plain_steps_then_weights(kind):
    loss_fn, miner = LOSSES["ms"](), AllPairsMiner()
    model, batch = problem(kind, 0)
    policy = MetaPairWeights(static_steps=2) if kind == "pair_weight" else MMSI(static_steps=2, warmup_classes=2)
    emb = model(batch.images)
    static = loss_fn(emb @ emb.T, miner(emb @ emb.T, batch.labels, epoch=0, generator=None))
    for step in range(3):
        batch.global_step = step
        out = policy.step(model, loss_fn, miner, batch)
        if step < 2:
            torch.testing.assert_close(out.loss, static, rtol=0, atol=0)
            assert float(out.logs["meta/static"]) == 1 and not out.skip_update
        else:
            assert "meta/static" not in out.logs and "meta/loss" in out.logs
    if kind == "mmsi":
        assert len(policy.memory) > 0  # the memory filled during the static steps


def test_protocol_recipe_composes_to_half_static_half_mmsi(tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    cfg = compose_train(["experiment=mmsi_protocol_synthetic"], tmp_path, tmp_path / "data")
    policy = instantiate(cfg.threshold_policy)
    assert isinstance(policy, MMSI) and policy.static_steps == 240 and cfg.dataset.name == "synthetic"
    steps_per_epoch = (cfg.dataset.source.num_classes // 2) * 3 // 4 * cfg.dataset.source.images_per_class // cfg.data.batch_size
    assert policy.static_steps * 2 == cfg.trainer.max_epochs * steps_per_epoch  # half of the run
