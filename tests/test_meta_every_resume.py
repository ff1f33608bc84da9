"""``threshold_policy.every=3`` through the CLI: a run stopped one step into a period (step 7 of 10)
and resumed from its last.ckpt ends exactly where the uninterrupted run ends (the hold/update
schedule follows the restored global step)."""

from __future__ import annotations

import torch

from ddtas_lightning.train import train
from tests.conftest import TINY_DATA, compose_train
from tests.test_resume import META, MID_EPOCH, RUN, final_state


def test_every_3_resumed_mid_period_matches_uninterrupted_run(tmp_path, data_dir):
    def cfg(run, *extra):
        return compose_train([*TINY_DATA, *RUN, *MID_EPOCH, *META, "threshold_policy.every=3",
                              f"paths.output_dir={tmp_path / run}", *extra], tmp_path, data_dir)

    train(cfg("full"))
    train(cfg("part", "+trainer.max_steps=7"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 7
    train(cfg("part", f"ckpt_path={ckpt}"))

    a, b = final_state(cfg("full")), final_state(cfg("part"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    assert int(a["policy.step_count"]) == 4  # meta steps 0, 3, 6, 9 of 10
