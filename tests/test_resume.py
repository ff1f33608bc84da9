"""A run stopped after an epoch and resumed from its last checkpoint ends exactly where an
uninterrupted run ends: same weights, same learned lambda and its optimiser moments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddtas_lightning.runtime.training import train
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
    first = cfg("part", "trainer.max_epochs=3", "trainer.max_steps=3")
    train(first)
    resumed = cfg("part", "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}")
    train(resumed)

    a, b = final_state(full), final_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    if "policy.lam" in a:
        assert not torch.equal(a["policy.lam"], torch.tensor(0.7, dtype=a["policy.lam"].dtype))  # lambda moved


MID_EPOCH = ["data.batches_per_epoch=5", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=1"]
META = ["threshold_policy=meta", "loss=soft_contrastive", "miner=at_asms", "data.meta_batch_size=4",
        "threshold_policy.lr=0.05"]
CONF = Path(__file__).resolve().parents[1] / "conf"
# (overrides, whether the tiny image set applies); variants whose configs other work adds run once present
VARIANTS = {
    "static": (["threshold_policy=static"], True),
    "static-2-workers": (["threshold_policy=static", "data.num_workers=2", "data.persistent_workers=true"], True),
    "meta": (META, True),
    "mmsi": (["threshold_policy=mmsi", "threshold_policy.warmup_classes=2", "data.meta_batch_size=4"], True),
    "nspa_gaussian_clusters": (["experiment=nspa_gaussian_clusters", "data.eval_batch_size=2000",
                                "trainer.check_val_every_n_epoch=1"], False),
}
REQUIRES = {"mmsi": CONF / "threshold_policy" / "mmsi.yaml",
            "nspa_gaussian_clusters": CONF / "experiment" / "nspa_gaussian_clusters.yaml"}


def variant(name):
    marks = [pytest.mark.skipif(not REQUIRES[name].is_file(), reason=f"{REQUIRES[name]} not present")] \
        if name in REQUIRES else []
    return pytest.param(name, marks=marks, id=name)


def resumed_equals_uninterrupted(tmp_path, data_dir, overrides: list[str], tiny: bool = True) -> dict:
    """Train 10 steps, and 7 steps then a resume from the step-7 last.ckpt to 10: the two end states
    must be equal bit for bit. Returns the end state."""
    from tests.conftest import TINY_DATA

    def cfg(run, *extra):
        return compose_train([*(TINY_DATA if tiny else []), *RUN, *MID_EPOCH, *overrides,
                              f"paths.output_dir={tmp_path / run}", *extra], tmp_path, data_dir)

    train(cfg("full"))
    train(cfg("part", "trainer.max_steps=7"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 7
    train(cfg("part", f"ckpt_path={ckpt}"))

    a, b = final_state(cfg("full")), final_state(cfg("part"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    return a


@pytest.mark.parametrize("name", [variant(n) for n in VARIANTS])
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, data_dir, name):
    """Stopped after 7 of 10 steps (batch 2 of epoch 1, from the step-7 last.ckpt), then resumed: the
    sampler continues with batch 3 of epoch 1 (same indices, same augmentation seeds), the RNG and
    the miner generator continue, and the end state (weights, BN statistics, policy buffers such as
    lambda, its moments or a memory) equals the uninterrupted run's bit for bit."""
    overrides, tiny = VARIANTS[name]
    a = resumed_equals_uninterrupted(tmp_path, data_dir, overrides, tiny)
    if name == "mmsi":
        assert any(k.endswith("embeddings") and v.numel() > 0 for k, v in a.items())  # the memory is filled
