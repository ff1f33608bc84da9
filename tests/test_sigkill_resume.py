"""A run SIGKILLed in the middle of an epoch and resumed with ``ckpt_path=last`` ends exactly where an
uninterrupted run ends (weights, learned lambda and its moments, test metrics), and a kill during a
checkpoint write never damages the previous checkpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ddtas_lightning.runtime.builder import build_trainer
from ddtas_lightning.runtime.checkpointing import AtomicCheckpointIO
from ddtas_lightning.runtime.training import train
from tests.conftest import TINY_DATA, compose_train

REPO = Path(__file__).resolve().parents[1]

# 2 epochs x 4 steps; last.ckpt every 2 steps (and at each epoch's end). The killed run is paused
# after step 7 (its last.ckpt is from step 6, batch 2 of epoch 1) and killed there.
RUN = ["trainer.accelerator=cpu", "trainer.check_val_every_n_epoch=1", "trainer.max_epochs=2",
       "data.batches_per_epoch=4", "callbacks.last_checkpoint.every_n_train_steps=2",
       "evaluate_before_training=false", "logger=csv", "trainer.enable_progress_bar=false"]
KILL_AFTER_STEP = 7
CONF = REPO / "conf"
VARIANTS = {
    "static": ["threshold_policy=static", *TINY_DATA],
    "meta": ["threshold_policy=meta", "loss=soft_contrastive", "miner=at_asms", "data.meta_batch_size=4",
             "threshold_policy.lr=0.05", *TINY_DATA],
    "mmsi": ["threshold_policy=mmsi", "threshold_policy.warmup_classes=2", "data.meta_batch_size=4", *TINY_DATA],
    "nspa_gaussian_clusters": ["experiment=nspa_gaussian_clusters", "data.eval_batch_size=2000"],
}


def slow_variant(name: str, requires: Path | None = None):
    """Slower variants (~25 s more CPU each than static): test_resume.py covers their mid-epoch resume
    in-process; those whose configs come from other work run once the config exists."""
    marks = [pytest.mark.slow]
    if requires is not None:
        marks.append(pytest.mark.skipif(not requires.is_file(), reason=f"{requires} not present"))
    return pytest.param(name, marks=marks, id=name)


class PauseAfterStep(pl.Callback):
    """Test-only callback for the run to be killed: after optimiser step ``step`` it writes ``marker``
    and sleeps, so the test kills it at a known point (mid-epoch, after a periodic checkpoint)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)


def cli(overrides: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddtas_lightning.train", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not reach the kill point in time")
        time.sleep(0.05)


def csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (int(r["step"]), sorted(r.items())))


def final(run_dir: Path) -> tuple[dict, dict]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    return state, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("variant", [
    "static",
    slow_variant("meta"),
    slow_variant("mmsi", CONF / "threshold_policy" / "mmsi.yaml"),
    slow_variant("nspa_gaussian_clusters", CONF / "experiment" / "nspa_gaussian_clusters.yaml"),
])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, data_dir, variant):
    overrides = [*RUN, *VARIANTS[variant], f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}"]

    # The uninterrupted run, in this process (the same code path as the CLI, minus Hydra's start-up).
    full_dir = tmp_path / "full"
    train(compose_train([*overrides, f"paths.output_dir={full_dir}"], tmp_path, data_dir))

    # The same run through the CLI, killed with SIGKILL after step 7 (mid-epoch 1) ...
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    marker = tmp_path / "paused"
    proc = cli([*overrides, f"hydra.run.dir={run_dir}", f"+callbacks.pause._target_={__name__}.PauseAfterStep",
                f"+callbacks.pause.step={KILL_AFTER_STEP}", f"+callbacks.pause.marker={marker}"], env)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and last["epoch"] == 1  # the periodic, mid-epoch checkpoint
    assert not (run_dir / "metrics.json").exists()

    # ... and resumed in the same run dir.
    resumed = subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=last"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    (a, metrics_a), (b, metrics_b) = final(full_dir), final(run_dir)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights, BN statistics, policy buffers (lambda, its moments), counters
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for p, s in opt_a["state"].items():
            for k, v in s.items():
                torch.testing.assert_close(opt_b["state"][p][k], v, rtol=0, atol=0, msg=f"optimizer {k}")
    assert a["lr_schedulers"] == b["lr_schedulers"]
    torch.testing.assert_close(b["miner_generator_state"], a["miner_generator_state"], rtol=0, atol=0)
    if variant == "meta":
        lam = a["state_dict"]["policy.lam"]
        assert not torch.equal(lam, torch.full_like(lam, 0.7))  # lambda did move
    if variant == "mmsi":  # the memory's contents were compared above; it must hold something
        assert any(k.endswith("embeddings") and v.numel() > 0 for k, v in a["state_dict"].items())
    for split in ("test", "val"):
        assert metrics_b[split] == metrics_a[split]  # bit-identical floats
    assert metrics_b["best_val_R@1"] == metrics_a["best_val_R@1"]
    assert Path(metrics_b["best_checkpoint"]).name == Path(metrics_a["best_checkpoint"]).name
    # The CSV log survives the kill: every step once, with the uninterrupted run's values. Except the
    # epoch mean train/loss_epoch of the interrupted epoch: Lightning does not checkpoint its running
    # mean mid-epoch, so the resumed epoch's mean covers the steps after the resume only.
    rows_a, rows_b = csv_rows(full_dir), csv_rows(run_dir)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    assert [{k: v for k, v in r.items() if k != "train/loss_epoch"} for r in rows_b] == [
        {k: v for k, v in r.items() if k != "train/loss_epoch"} for r in rows_a]


def test_trainer_writes_checkpoints_atomically(tiny_cfg):
    trainer = build_trainer(tiny_cfg("trainer.accelerator=cpu", "logger=none"))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from ddtas_lightning.runtime.checkpointing import AtomicCheckpointIO

    path = sys.argv[1]
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)

    real_save = torch.save

    class DiesHalfway:  # a file that is SIGKILLed once 1 MB of the 40 MB checkpoint is on disk
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            room = (1 << 20) - self.n
            if len(b) > room:
                self.f.write(bytes(memoryview(b)[:room]))
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            self.n += len(b)
            return self.f.write(b)
        def __getattr__(self, name):
            return getattr(self.f, name)

    torch.save = lambda obj, f, *a, **k: real_save(obj, DiesHalfway(f), *a, **k)
    io.save_checkpoint({"step": 2, "w": torch.zeros(10_000_000)}, path)
""")


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = list(path.parent.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size >= 1 << 20  # killed mid-write, beside the target
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, intact

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save clears the killed one's file
    assert torch.load(path, weights_only=True)["step"] == 3
    assert list(path.parent.iterdir()) == [path]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # the temp file was removed
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's owner-only


def test_a_write_in_flight_is_not_taken_for_a_killed_one(tmp_path):
    """Stale temp files are removed only when their writer is gone: another live process's (here: this
    process's own name) stays."""
    import socket

    path = tmp_path / "last.ckpt"
    in_flight = tmp_path / f".last.ckpt.{socket.gethostname()}-{os.getpid()}.abc.tmp"
    in_flight.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    assert in_flight.exists() and torch.load(path, weights_only=True)["step"] == 1
