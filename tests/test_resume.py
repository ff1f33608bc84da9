"""A run stopped after an epoch and resumed from its last checkpoint ends exactly where an
uninterrupted run ends: same weights, same learned lambda and its optimiser moments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddtas_lightning.train import train
from tests.conftest import compose_train

RUN = ["trainer.accelerator=cpu", "trainer.check_val_every_n_epoch=1", "evaluate_before_training=false",
       "test_after_training=false", "logger=none", "data.num_workers=0", "trainer.deterministic=true"]


def final_state(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("policy", [
    ["threshold_policy=static"],
    ["threshold_policy=meta", "loss=soft_contrastive", "miner=at_asms", "data.meta_batch_size=4",
     "threshold_policy.lr=0.05"],
])
def test_resume_from_last_checkpoint_matches_uninterrupted_run(tiny_cfg, tmp_path, data_dir, policy):
    from tests.conftest import TINY_DATA

    def cfg(name, *extra):
        return compose_train([*TINY_DATA, *RUN, *policy, f"paths.output_dir={tmp_path / name}", *extra],
                             tmp_path, data_dir)

    full = cfg("full", "trainer.max_epochs=3")
    train(full)
    # Stop after the first epoch (3 steps) of the same 3-epoch run, as a kill would: changing max_epochs
    # instead would change the cosine schedule's T_max.
    first = cfg("part", "trainer.max_epochs=3", "+trainer.max_steps=3")
    train(first)
    resumed = cfg("part", "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}")
    train(resumed)

    a, b = final_state(full), final_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    if "policy.lam" in a:
        assert not torch.equal(a["policy.lam"], torch.tensor(0.7, dtype=a["policy.lam"].dtype))  # lambda moved
