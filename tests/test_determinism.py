"""The same seed gives the same run on CPU: identical metrics.json values and train loss curve, twice in
a row, and also with DataLoader workers (augmentations are seeded per batch, see data/batch_rng.py)."""

from __future__ import annotations

import csv
import json

from ddtas_lightning.runtime.training import train
from tests.conftest import TINY_DATA, compose_train

RUN = [*TINY_DATA, "trainer.accelerator=cpu", "trainer.max_epochs=2", "data.batches_per_epoch=3",
       "trainer.check_val_every_n_epoch=1", "logger=csv", "trainer.enable_progress_bar=false"]
VARYING = {"train_time_s", "wall_time_s", "best_checkpoint", "overrides"}  # times and run-dir paths


def run(tmp_path, data_dir, name: str, *extra: str) -> tuple[dict, list[tuple[str, str]]]:
    out = tmp_path / name
    train(compose_train([*RUN, f"paths.output_dir={out}", *extra], tmp_path, data_dir))
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "csv" / "metrics.csv") as f:
        curve = [(row["step"], row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    # compute: the seconds vary, the passes through the model do not
    metrics["compute"] = {k: v for k, v in metrics["compute"].items() if not k.endswith("_s")}
    return {k: v for k, v in metrics.items() if k not in VARYING}, curve


def test_same_seed_same_metrics_and_loss_curve(tmp_path, data_dir):
    first, curve1 = run(tmp_path, data_dir, "a")
    second, curve2 = run(tmp_path, data_dir, "b")
    assert len(curve1) == 6  # one train loss per step
    assert curve2 == curve1
    assert second == first  # untrained, val and test metrics, best R@1, steps: exactly equal floats
    # With 2 DataLoader workers the batches and their augmentations are the same as in the main process.
    workers, curve3 = run(tmp_path, data_dir, "c", "data.num_workers=2", "data.persistent_workers=true")
    assert curve3 == curve1 and workers == first
    other, curve4 = run(tmp_path, data_dir, "d", "seed=1")
    assert curve4 != curve1  # the comparison can fail: another seed gives another run
