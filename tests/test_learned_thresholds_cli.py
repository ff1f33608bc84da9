"""Learned-threshold policies through the CLI on the embedded synthetic set (tiny settings)."""

from __future__ import annotations

import csv

import pytest

from tests.test_train_cli import run_cli


def _column(path, key):
    with open(path) as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.parametrize("policy", ["meta", "hypergrad"])
def test_lambda_moves_under_bf16_true(tmp_path, policy):
    """trainer.precision=bf16-true casts the module to bf16; the policy's lambda stays float32, so its
    ~1e-3 steps are not rounded away (in bf16 lambda stuck at 0.69921875)."""
    # hypergrad: its constant step size (the run_length default crosses [min, max] within these 6 steps)
    extra = ["threshold_policy.lr_schedule=constant"] if policy == "hypergrad" else []
    r = run_cli(f"threshold_policy={policy}", *extra, "data.meta_batch_size=4", "data.meta_K=2", "loss.threshold=0.7",
                "trainer.precision=bf16-true", "trainer.max_epochs=2", "trainer.accelerator=cpu",
                "evaluate_before_training=false", "test_after_training=false", "logger=csv", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lam = _column(tmp_path / "run" / "csv" / "metrics.csv", "train/lambda")
    assert len(lam) == 6
    assert lam[0] == pytest.approx(0.7, abs=1.5e-3)  # at most one step from 0.7 (hypergrad: none yet)
    assert len(set(lam)) >= 4  # it keeps moving (steps ~1e-3, each applied)
    assert all(v != round(v * 256) / 256 for v in lam[1:])  # not on the bf16 grid near 0.7 (spacing 1/256)
