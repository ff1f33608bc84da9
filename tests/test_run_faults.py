"""Fault tests of a run's life (issue 16): SIGTERM / SIGINT mid-training, two runs in one run dir, a
resume with a changed config, a checkpoint write that fails for a full disk. Real CLI subprocesses on
the tiny synthetic set (settings of tests/test_sigkill_resume.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ddtas_lightning.runtime import checkpointing
from ddtas_lightning.runtime.checkpoint_compat import CONFIG_KEY
from ddtas_lightning.runtime.checkpointing import CheckpointWriteError
from ddtas_lightning.runtime.errors import exit_code_for
from ddtas_lightning.runtime.run_dir import RunDirBusyError, acquire_lock, release_lock
from ddtas_lightning.runtime.training import train
from tests.conftest import TINY_DATA, compose_train
from tests.test_sigkill_resume import RUN, cli, final, wait_for

REPO = Path(__file__).resolve().parents[1]
STOP_AT = 3  # the signal arrives after optimiser step 3 (mid-epoch 0 of 2 x 4 steps); no periodic save there
# No periodic last.ckpt before the signal: what the resumed run finds was written at the signal.
SIGNAL_RUN = [*[o for o in RUN if not o.startswith("callbacks.last_checkpoint")],
              "callbacks.last_checkpoint.every_n_train_steps=0", *TINY_DATA]


class WaitForSignal(pl.Callback):
    """Test-only: after optimiser step ``step`` write ``marker`` and idle until the trainer has seen a
    stop signal (so the test signals the run at a known point)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(trainer.global_step))
            deadline = time.monotonic() + 120
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.02)


def env() -> dict:
    # the CLI runs with this process's thread count, so its float sums match the in-process reference run
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO),
            "WANDB_MODE": "disabled"}


def paused_run(tmp_path: Path, data_dir: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"paused_{run_dir.name}"
    proc = cli([*SIGNAL_RUN, f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                f"+callbacks.wait._target_={__name__}.WaitForSignal", f"+callbacks.wait.step={STOP_AT}",
                f"+callbacks.wait.marker={marker}", *extra], env())
    return proc, marker


def stop_with(sig: signal.Signals, tmp_path: Path, data_dir: Path, run_dir: Path) -> tuple[int, str]:
    """A run paused after step STOP_AT, sent ``sig``: its exit code and output."""
    proc, marker = paused_run(tmp_path, data_dir, run_dir)
    wait_for(marker, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddtas_lightning.train", *overrides], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_sigterm_saves_last_ckpt_exits_143_and_the_resume_matches_an_uninterrupted_run(tmp_path, data_dir):
    base = [*SIGNAL_RUN, f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}"]
    full_dir = tmp_path / "full"
    train(compose_train([*base, f"paths.output_dir={full_dir}"], tmp_path, data_dir))

    run_dir = tmp_path / "stopped"
    code, out = stop_with(signal.SIGTERM, tmp_path, data_dir, run_dir)
    assert code == 143, out[-3000:]
    last_line = out.strip().splitlines()[-1]
    assert last_line.startswith(f"error: stopped by SIGTERM at step {STOP_AT}; the state at the signal is saved in "
                                f"{run_dir}/checkpoints/last.ckpt. Resume with: python -m ddtas_lightning.train ")
    assert last_line.endswith(f"ckpt_path=last hydra.run.dir={run_dir}"), last_line
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == STOP_AT and saved[CONFIG_KEY]["seed"] == 0
    assert not (run_dir / "metrics.json").exists()

    resumed = run_cli(*base, f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a, metrics_a), (b, metrics_b) = final(full_dir), final(run_dir)
    assert a["global_step"] == b["global_step"] == 8
    for key in a["state_dict"]:  # continued at the exact next batch: bit-identical weights and metrics
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    assert metrics_b["test"] == metrics_a["test"]


@pytest.mark.slow  # ~25 s: one more CLI run; the SIGTERM test covers the same path (SIGINT sets the same flag)
def test_sigint_saves_last_ckpt_and_exits_130(tmp_path, data_dir):
    run_dir = tmp_path / "interrupted"
    code, out = stop_with(signal.SIGINT, tmp_path, data_dir, run_dir)
    assert code == 130, out[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"error: stopped by SIGINT at step {STOP_AT}")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STOP_AT


@pytest.mark.slow  # ~30 s: two CLI runs; test_lock_is_exclusive_between_open_files and the catalogue cover it fast
def test_a_second_run_in_a_run_dir_in_use_is_refused_and_the_lock_dies_with_its_holder(tmp_path, data_dir):
    run_dir = tmp_path / "shared"
    first, marker = paused_run(tmp_path, data_dir, run_dir)
    wait_for(marker, first)
    config_before = (run_dir / ".hydra" / "config.yaml").read_bytes()
    second = run_cli(*TINY_DATA, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", "seed=1", cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: hydra.run.dir: {run_dir} is in use by another run (pid {first.pid} on "), last
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before  # the second wrote nothing
    first.send_signal(signal.SIGKILL)  # no cleanup at all: the OS releases the flock
    first.wait(timeout=30)
    release_lock(acquire_lock(run_dir))


def test_lock_is_exclusive_between_open_files(tmp_path):
    fd = acquire_lock(tmp_path)
    with pytest.raises(RunDirBusyError, match=r"is in use by another run \(pid \d+ on "):
        acquire_lock(tmp_path)
    release_lock(fd)
    release_lock(acquire_lock(tmp_path))


def test_default_run_dir_names_carry_microseconds():
    text = (REPO / "conf" / "hydra" / "default.yaml").read_text()
    assert "dir: outputs/${task_name}/${now:%Y-%m-%d}_${now:%H-%M-%S}-${now:%f}" in text
    assert "dir: multirun/${task_name}/${now:%Y-%m-%d}_${now:%H-%M-%S}\n" in text  # sweep layout kept


def test_resume_with_a_changed_config_is_refused_before_the_run_dir_is_touched(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    common = [*TINY_DATA, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", "trainer.accelerator=cpu",
              "evaluate_before_training=false", "test_after_training=false", "logger=none",
              "data.batches_per_epoch=1", "trainer.max_epochs=1"]
    first = run_cli(*common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    hydra_dir = run_dir / ".hydra"
    before = {p.name: p.read_bytes() for p in hydra_dir.iterdir()}
    again = run_cli(*common, "ckpt_path=last", "optimizer=sgd", cwd=tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: ckpt_path: checkpoint {run_dir}/checkpoints/last.ckpt was written under another "
                           "config: config values that differ: optimizer._target_: 'torch.optim.Adam' in the "
                           "checkpoint's run, 'torch.optim.SGD' here; optimizer.lr: "), last
    assert {p.name: p.read_bytes() for p in hydra_dir.iterdir()} == before  # still the checkpoint's config
    longer = run_cli(*[o for o in common if not o.startswith("trainer.max_epochs")], "trainer.max_epochs=2",
                     "ckpt_path=last", cwd=tmp_path)  # training longer is a resume, not another config
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_steps"] == 2


def test_a_full_disk_during_a_save_is_one_error_and_keeps_the_previous_last_ckpt(tmp_path, data_dir, monkeypatch,
                                                                                  one_thread):
    cfg = compose_train([*TINY_DATA, "trainer.accelerator=cpu", "evaluate_before_training=false",
                         "test_after_training=false", "logger=none", "~callbacks.model_checkpoint",
                         "data.batches_per_epoch=4", "trainer.max_epochs=1",
                         "callbacks.last_checkpoint.every_n_train_steps=2"], tmp_path, data_dir)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    real_write = checkpointing._RecordingFile.write

    def write(self, data):  # the disk is full once the first last.ckpt is on it
        if last.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(checkpointing._RecordingFile, "write", write)
    with pytest.raises(CheckpointWriteError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {last}: No space left on device (errno 28, ENOSPC); the "
                              f"previous {last} is kept."), message
    assert exit_code_for(info.value) == 2
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the save at step 2, intact
    assert list(last.parent.iterdir()) == [last]  # no temp file left behind
