"""The non-finite guard through the real trainer: non-finite steps are skipped (weights, optimiser,
BatchNorm statistics and policy state untouched), counted and logged; after
``module.max_nonfinite_steps`` in a row the run stops with one clear message and a checkpoint of the
last good state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ddtas_lightning.module import DMLModule, NonFiniteLossError
from ddtas_lightning.runtime.training import train
from tests.conftest import TINY_DATA, compose_train

REPO = Path(__file__).resolve().parents[1]
FIRST_BAD = 2  # 0-based batch index from which the images are NaN
RUN = [*TINY_DATA, "trainer.accelerator=cpu", "trainer.max_epochs=1", "data.batches_per_epoch=6",
       "evaluate_before_training=false", "logger=none", "module.max_nonfinite_steps=3",
       "trainer.enable_progress_bar=false"]
POLICIES = {
    "static": ["threshold_policy=static"],
    # the meta policy updates lambda before the real loss; a NaN meta batch must leave it alone
    "meta": ["threshold_policy=meta", "loss=soft_contrastive", "miner=at_asms", "data.meta_batch_size=4"],
}


@pytest.fixture
def nan_from_batch(monkeypatch):
    """From batch FIRST_BAD on, every image (train and meta part) is NaN; records the module's state
    just before the first bad step (= after the last good one) and the logged skip counts."""
    seen = {"batches": 0, "good_state": None, "skipped_logged": []}
    split_batch, log_dict = DMLModule.split_batch, DMLModule.log_dict

    def poisoned(self, batch):
        if seen["batches"] == FIRST_BAD:
            seen["good_state"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if seen["batches"] >= FIRST_BAD:
            images, labels, index = batch
            batch = (torch.full_like(images, float("nan")), labels, index)
        seen["batches"] += 1
        return split_batch(self, batch)

    def spy(self, values, *args, **kwargs):
        if "train/nonfinite_skipped" in values:
            seen["skipped_logged"].append(float(values["train/nonfinite_skipped"]))
        return log_dict(self, values, *args, **kwargs)

    monkeypatch.setattr(DMLModule, "split_batch", poisoned)
    monkeypatch.setattr(DMLModule, "log_dict", spy)
    return seen


@pytest.mark.parametrize("policy", list(POLICIES))
def test_nonfinite_steps_stop_the_run_with_a_checkpoint_of_the_last_good_state(
    tmp_path, data_dir, nan_from_batch, policy
):
    cfg = compose_train([*RUN, *POLICIES[policy]], tmp_path, data_dir)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "nonfinite_stop.ckpt"
    message = str(err.value)
    assert "3 non-finite losses/gradients in a row" in message
    assert "module.max_nonfinite_steps=3" in message and str(ckpt) in message

    assert nan_from_batch["batches"] == FIRST_BAD + 3  # stopped at the third bad step in a row
    assert nan_from_batch["skipped_logged"] == [0.0] * FIRST_BAD + [1.0, 2.0]  # the third raised
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == FIRST_BAD  # skipped steps are not optimiser steps
    good, saved = nan_from_batch["good_state"], state["state_dict"]
    assert saved.keys() == good.keys()
    for key in good:
        if key.startswith("nonfinite_"):
            continue
        torch.testing.assert_close(saved[key], good[key], rtol=0, atol=0, msg=f"{key} changed by a bad step")
    assert int(saved["nonfinite_in_a_row"]) == int(saved["nonfinite_total"]) == 3
    if policy == "meta":
        assert torch.isfinite(saved["policy.lam"]).all()
    for s in state["optimizer_states"][0]["state"].values():
        assert all(torch.isfinite(v).all() for v in s.values() if torch.is_tensor(v))


class NaNImagesFrom(pl.Callback):
    """Test-only callback for the CLI run: the images of batch ``batch`` and later become NaN (in place,
    before the training step sees them)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= self.batch:
            batch[0].fill_(float("nan"))


def test_cli_prints_one_error_line_and_exits_non_zero(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", *RUN, *POLICIES["static"], f"paths.root_dir={tmp_path}",
         f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", "test_after_training=false",
         f"+callbacks.nan._target_={__name__}.NaNImagesFrom", f"+callbacks.nan.batch={FIRST_BAD}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    ckpt = run_dir / "checkpoints" / "nonfinite_stop.ckpt"
    assert "3 non-finite" in errors[0] and str(ckpt) in errors[0]
    assert "Traceback" not in proc.stderr
    assert torch.load(ckpt, weights_only=False)["global_step"] == FIRST_BAD


def test_an_isolated_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, data_dir, monkeypatch):
    """One bad batch among good ones: skipped and counted, the run finishes, the count is reported."""
    split_batch = DMLModule.split_batch
    count = {"n": 0}

    def one_bad(self, batch):
        count["n"] += 1
        if count["n"] == 3:
            images, labels, index = batch
            batch = (torch.full_like(images, float("nan")), labels, index)
        return split_batch(self, batch)

    monkeypatch.setattr(DMLModule, "split_batch", one_bad)
    cfg = compose_train([*RUN, "test_after_training=false"], tmp_path, data_dir)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["nonfinite_skipped"] == 1 and metrics["global_steps"] == 5
    assert not (Path(cfg.paths.output_dir) / "checkpoints" / "nonfinite_stop.ckpt").exists()


def test_a_run_whose_every_update_was_skipped_fails_with_exit_3_and_says_so(tmp_path, data_dir, monkeypatch):
    """6 steps, all non-finite, under module.max_nonfinite_steps=10: the guard never stopped the run, which
    used to exit 0 and write metrics.json like a trained run. Now: exit 3 (the guard's code), one error naming
    the count, metrics.json with "status": "not_trained" and no test metrics; compare reads it as failed."""
    from ddtas_lightning.report.runs import Run
    from ddtas_lightning.runtime.errors import exit_code_for

    split_batch = DMLModule.split_batch

    def all_bad(self, batch):
        images, labels, index = batch
        return split_batch(self, (torch.full_like(images, float("nan")), labels, index))

    monkeypatch.setattr(DMLModule, "split_batch", all_bad)
    run = [o for o in RUN if not o.startswith("module.max_nonfinite_steps")]
    cfg = compose_train([*run, "module.max_nonfinite_steps=10"], tmp_path, data_dir)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    assert str(err.value).startswith("every training update was skipped: 6 non-finite losses/gradients and 0 "
                                     "optimiser updates")
    assert exit_code_for(err.value) == 3
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "not_trained" and metrics["trained"] is False
    assert metrics["nonfinite_skipped"] == 6 and metrics["global_steps"] == 0 and "test" not in metrics
    run_record = Run.load(out)
    assert not run_record.ok and run_record.error.startswith("not trained: every training update was skipped")
