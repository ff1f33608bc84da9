"""One run per run dir, checked before Hydra writes anything into it.

Hydra writes ``<run dir>/.hydra/{config,hydra,overrides}.yaml`` before the task function runs, so a
check in ``train()`` comes too late to keep a run dir's record of its checkpoints. :class:`RunDirGuard`
is a Hydra callback (``conf/hydra/default.yaml``) whose ``on_run_start`` runs before that, and:

* takes an exclusive ``flock`` on ``<run dir>/.run.lock`` for the life of the process (the OS releases
  it when the process ends, however it ends: no stale locks). A second run in the same dir gets one
  ``error:`` line and exit code 2 instead of both corrupting the CSV log and neither writing metrics;
* refuses a run dir it cannot write (read-only file system, permissions);
* for ``ckpt_path=last`` (or a path), compares the config with the one saved inside the checkpoint
  (:func:`ddtas_lightning.runtime.checkpoint_compat.check_resume_config`) and refuses a changed config before
  ``.hydra/config.yaml`` is overwritten, so the run dir keeps recording the config of its checkpoints.

In multirun mode every job has its own dir (``<sweep dir>/<job num>``); ``on_job_start`` takes the
job's lock (Hydra has written the job's ``.hydra`` by then; the config check runs in ``train()``), and a
job dir in use (two sweeps given one sweep dir) stops the second sweep with one ``error:`` line.

:func:`check_writable` is the same check for ``train()`` called without Hydra, and
:func:`run_callbacks` the trainer callbacks of a run: the config saved in every checkpoint, the
checkpoint at SIGTERM/SIGINT (:mod:`ddtas_lightning.runtime.signals`) and the R@K-vs-gallery warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.config.validation import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"


class RunDirBusyError(ConfigError):
    """Another live process holds the run dir's lock."""


def acquire_lock(run_dir: str | Path) -> int:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.run.lock``; returns the open file
    descriptor (keep it open: closing it, or the process ending, releases the lock)."""
    run_dir = Path(run_dir)
    check_writable(run_dir, what="hydra.run.dir")
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RunDirBusyError(
                f"hydra.run.dir: {run_dir} is in use by another run ({holder or 'a live process'} holds "
                f"{path}); two runs in one dir would overwrite each other's logs and checkpoints. Wait for it "
                "to end, or choose another hydra.run.dir (the default name is unique per start)"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
    return fd


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def release_lock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def check_writable(directory: str | Path, what: str = "paths.output_dir") -> None:
    """Create ``directory`` if needed and write (then remove) a probe file in it; one ConfigError naming
    ``what`` and the OS's reason otherwise (read-only file system, permissions, full disk)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe.", delete=True) as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{what}: cannot write to {directory} ({reason}); the run needs a writable directory "
                          "for its logs and checkpoints: choose another hydra.run.dir (or free space)") from None


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID")


def secondary_rank() -> bool:
    """A DDP process other than rank 0 (started by Lightning, srun or submitit with the rank in its
    environment): it shares rank 0's run dir, so it must not take the lock rank 0 holds."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in RANK_VARIABLES)


class RunDirGuard(Callback):
    """Hydra callback: the run dir's lock, writability and resume-config check (see the module doc).
    Only rank 0 of a multi-process (DDP) run takes the lock: the other ranks share its dir."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if secondary_rank():
            return
        run_dir = Path(str(config.hydra.run.dir))
        try:
            self._fd = acquire_lock(run_dir)
            ckpt = _resume_checkpoint(config, run_dir)
            if ckpt is not None:
                from ddtas_lightning.runtime.checkpoint_compat import check_resume_config

                task = OmegaConf.to_container(config, resolve=False)
                task.pop("hydra", None)
                check_resume_config(ckpt, OmegaConf.create(task))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_lock(self._fd)
        self._fd = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN or secondary_rank():
            return  # single runs were locked in on_run_start; other DDP ranks share rank 0's dir
        try:  # a job dir in use means another sweep writes this sweep dir: stop this sweep
            self._fd = acquire_lock(HydraConfig.get().runtime.output_dir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            release_lock(self._fd)
            self._fd = None


def _resume_checkpoint(config: DictConfig, run_dir: Path) -> Path | None:
    ckpt = config.get("ckpt_path")
    if ckpt in (None, ""):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(str(ckpt))
    return path if path.is_file() else None  # a missing path: train() gives its own message


# ---- trainer callbacks of every run ------------------------------------------------------------------
class ConfigInCheckpoint(pl.Callback):
    """Saves the run's composed config (unresolved, as ``.hydra/config.yaml``) in every checkpoint, so a
    resume is compared with the config that wrote the weights, wherever the checkpoint is copied."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=False)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Weights-only checkpoints (the best one) skip callbacks' on_save_checkpoint; the module writes
        # the config into those (DMLModule.on_save_checkpoint).
        pl_module.run_config = self.config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        from ddtas_lightning.runtime.checkpoint_compat import CONFIG_KEY

        checkpoint[CONFIG_KEY] = self.config


def run_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks every training run gets (``train.build_trainer``)."""
    from ddtas_lightning.runtime.metrics_checks import RecallAtKCheck
    from ddtas_lightning.runtime.signals import StopOnSignal

    return [ConfigInCheckpoint(cfg), StopOnSignal(cfg.paths.output_dir), RecallAtKCheck()]


def check_run_dir_writable(output_dir: str | Path) -> None:
    """``train()``'s check before anything runs: the run dir, and its ``checkpoints/`` if it exists
    (a read-only checkpoint dir of an earlier run), can be written."""
    output_dir = Path(output_dir)
    check_writable(output_dir)
    if (output_dir / "checkpoints").is_dir():
        check_writable(output_dir / "checkpoints", what="paths.output_dir/checkpoints")
