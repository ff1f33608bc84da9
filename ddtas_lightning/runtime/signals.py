"""SIGTERM and SIGINT stop a run cleanly: ``last.ckpt`` saved at the signal, a non-zero exit, one line.

Lightning's own SIGTERM handling sets ``trainer.received_sigterm``; the loops then raise
``SIGTERMException`` at the next batch boundary, which is a ``SystemExit`` with code ``None``: the
process exited 0 and kept nothing since the last periodic checkpoint. :class:`StopOnSignal` (a trainer
callback) makes SIGINT (Ctrl-C) take the same route (the first one; a second Ctrl-C interrupts at once),
saves ``<run dir>/checkpoints/last.ckpt`` when the exception reaches the callbacks (between two batches,
so the saved state is a consistent one; the write is atomic, :mod:`ddtas_lightning.runtime.checkpointing`), and
records what happened on the exception. :func:`exit_for_signal` turns it into one ``error:`` line naming
the checkpoint and the resume command, and the exit code a shell gives a process killed by the signal
(143 = 128 + SIGTERM, 130 = 128 + SIGINT), so schedulers, CI and sweeps see a failure.

SIGUSR2 is not touched: it stays SLURM's requeue signal (:mod:`ddtas_lightning.runtime.slurm`).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["SIGTERMException", "StopOnSignal", "exit_for_signal"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(pl.Callback):
    """Save ``<output_dir>/checkpoints/last.ckpt`` when a run is stopped by SIGTERM or SIGINT.

    The handlers are installed at ``on_train_start`` (after Lightning's, which they wrap) and put back
    by Lightning's own teardown of its signal handlers.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.received: signal.Signals | None = None

    @property
    def last_path(self) -> Path:
        return self.output_dir / "checkpoints" / "last.ckpt"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        if signal.getsignal(signal.SIGTERM) in (None, signal.SIG_DFL, signal.SIG_IGN):
            return  # not the main thread, or Lightning installed nothing: leave the defaults
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.received is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
            self.received = signal.Signals(signum)
            log.warning("received %s: stopping after the current batch and saving %s",
                        self.received.name, self.last_path)
            if callable(lightning_sigterm):
                lightning_sigterm(signal.SIGTERM, frame)  # sets trainer.received_sigterm (all ranks)

        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.stop_signal = self.received or signal.SIGTERM  # type: ignore[attr-defined]
        exception.global_step = int(trainer.global_step)  # type: ignore[attr-defined]
        if trainer.state.fn != TrainerFn.FITTING:
            return  # evaluation: nothing to save (the fit's checkpoints are on disk)
        trainer.save_checkpoint(self.last_path)  # every rank takes part; rank 0 writes (atomically)
        exception.checkpoint = self.last_path  # type: ignore[attr-defined]


def exit_for_signal(exc: SIGTERMException, run_dir: str | Path, overrides: list[str] | None = None) -> int:
    """Print the one ``error:`` line for a run stopped by a signal; returns the exit code (128 + signal)."""
    sig = getattr(exc, "stop_signal", signal.SIGTERM)
    step = getattr(exc, "global_step", None)
    ckpt = getattr(exc, "checkpoint", None)
    at = f" at step {step}" if step is not None else ""
    given = [o for o in (overrides or []) if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    command = " ".join(["python -m ddtas_lightning.train", *given, "ckpt_path=last", f"hydra.run.dir={run_dir}"])
    sweep = study_resume_command()
    if sweep is not None:  # a trial of an Optuna study: a single-run command would run outside the study
        print(f"error: stopped by {sig.name}{at}; this run is a trial of an Optuna study (hydra/sweeper=tpe), so "
              f"resume the study, not the run: re-run the same -m command with the same sweep dir: {sweep} (the "
              "study continues where it stopped; this trial's parameters run again as a new trial)", file=sys.stderr)
        return 128 + int(sig)
    if ckpt is not None:
        what = f"stopped by {sig.name}{at}; the state at the signal is saved in {ckpt}. Resume with: {command}"
    else:
        what = (f"stopped by {sig.name}{at} outside training (nothing new to save); the run's checkpoints are in "
                f"{Path(run_dir) / 'checkpoints'}. Resume with: {command}")
    print(f"error: {what}", file=sys.stderr)
    return 128 + int(sig)


def study_resume_command() -> str | None:
    """The command that resumes the Optuna study this job is a trial of (None: not a TPE sweep's job): the
    sweep's own command-line overrides (``<sweep dir>/multirun.yaml``, written when it started) with
    ``-m`` and the same ``hydra.sweep.dir``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN or not str(hc.sweeper.get("_target_", "")).endswith("TPESweeper"):
        return None
    sweep_dir = str(hc.sweep.dir)
    given: list[str] = []
    try:
        saved = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
        given = [str(o) for o in OmegaConf.select(saved, "hydra.overrides.task", default=[]) or []]
    except Exception:  # no multirun.yaml: the sweep's overrides are unknown; name the sweep dir at least
        given = ["<the sweep's overrides>"]
    given = [o for o in given if not o.startswith("hydra.sweep.dir=")]
    return " ".join(["python -m ddtas_lightning.train -m", *given, f"hydra.sweep.dir={sweep_dir}"])
