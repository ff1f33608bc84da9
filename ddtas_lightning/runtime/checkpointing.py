"""Checkpoint files that survive a kill, and the periodic ``last.ckpt`` that a killed run resumes from.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes through an fsspec transaction;
for a local path that is a temporary file in the system temp dir followed by ``shutil.move``, which is a
copy onto the final path (not atomic) whenever the temp dir is on another file system, and nothing is
fsynced, so a power loss can leave a renamed but empty file. :class:`AtomicCheckpointIO` writes next to
the target instead, fsyncs, and renames with ``os.replace`` (atomic on POSIX): at every instant the
path holds either the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ddtas_lightning.config.validation import ConfigError

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path, owner: str = "") -> str:
    """Temp files are named ``.<name>.<host>-<pid>.<random>.tmp``: hidden, next to the target, and
    traceable to the process that writes them."""
    return f".{path.name}.{owner}"


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}."


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (full disk, read-only file system, ...): reported as one
    ``error:`` line (exit code 2), the previous file of that name left intact."""


class _RecordingFile:
    """A file whose first ``OSError`` on write is kept: ``torch.save`` turns it into a bare
    ``RuntimeError: [enforce fail at inline_container.cc]`` that no longer says why."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same directory, flush + fsync, rename,
    fsync the directory (so the rename itself is durable). Leftover temp files of earlier writers that
    were killed mid-write are removed after a successful save. A write that fails for lack of space or
    permission (ENOSPC, EROFS, EDQUOT, EACCES, ...) raises :class:`CheckpointWriteError`; the previous
    checkpoint at ``path`` is untouched either way."""
    path = Path(path)
    recorder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, _owner()), suffix=_TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            torch.save(obj, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(cause, OSError) and cause.errno is not None:
            raise _write_error(path, cause) from None
        raise
    _fsync_dir(path.parent)
    _remove_stale_temps(path)


def _write_error(path: Path, e: OSError) -> CheckpointWriteError:
    kept = f"the previous {path} is kept" if path.is_file() else f"no earlier {path.name} existed"
    return CheckpointWriteError(
        f"cannot write checkpoint {path}: {e.strerror or e} (errno {e.errno}, {errno.errorcode.get(e.errno, '?')}); "
        f"{kept}. Free space on (or make writable) {path.parent}, or choose another hydra.run.dir; the run can "
        "be resumed from its last checkpoint with ckpt_path=last"
    )


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``path`` whose writer is gone: a process of this host that no longer runs
    (killed mid-write), or, from another host, untouched for an hour. A write in flight is left alone."""
    host = socket.gethostname()
    for tmp in path.parent.glob(f"{_temp_prefix(path)}*{_TMP_SUFFIX}"):
        owner = tmp.name[len(_temp_prefix(path)):].split(".", 1)[0]
        writer_host, _, pid = owner.rpartition("-")
        try:
            if writer_host == host and pid.isdigit():
                if _alive(int(pid)):
                    continue
            elif time.time() - tmp.stat().st_mtime < 3600:
                continue
            tmp.unlink()
        except OSError:  # already gone
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring); remote URLs
    (``s3://`` ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = str(path).removeprefix("file://")
        atomic_torch_save(checkpoint, local)


def with_atomic_checkpoint_io(plugins: list | None) -> list:
    """The trainer's plugins with :class:`AtomicCheckpointIO` added, unless one of them already is a
    ``CheckpointIO`` (a config that chooses its own keeps it)."""
    plugins = list(plugins or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class PeriodicCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimiser steps *and* at the end of every epoch.

    Lightning's ``ModelCheckpoint`` accepts only one of the two triggers. The step trigger makes a
    kill lose at most N steps; the epoch-end save records the state after validation. A step save on
    an epoch's last batch is skipped: it would be written before that epoch's validation, and a run
    resumed from it would skip the validation (the epoch-end save follows a moment later anyway).
    """

    def __init__(self, every_n_train_steps: int = 50, **kwargs: Any) -> None:
        kwargs.setdefault("save_on_train_epoch_end", True)
        super().__init__(every_n_train_steps=every_n_train_steps or None, **kwargs)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Not the parent's: under manual optimisation it warns at every save and looks for test-only
        # attributes. The state after the step is what we want (the loop counts the batch as done).
        n = self._every_n_train_steps
        if trainer.is_last_batch or n < 1 or trainer.global_step % n != 0:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        # The parent only saves here when every_n_epochs is set, which the step trigger excludes.
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


# ---- the last good state, for the non-finite guard --------------------------------------------------
BufferSnapshot = list[tuple[torch.nn.Module, str, torch.Tensor]]


def snapshot_buffers(*modules: torch.nn.Module) -> BufferSnapshot:
    """Copies of every buffer of ``modules`` (BatchNorm statistics, a policy's lambda and its moments, a
    memory bank), taken before a training step that may turn out non-finite. Parameters are not
    copied: only the optimiser changes them, and a skipped step does not call it."""
    return [
        (owner, name, buf.detach().clone())
        for module in modules
        for owner in module.modules()
        for name, buf in owner._buffers.items()
        if buf is not None
    ]


def restore_buffers(snapshot: BufferSnapshot) -> None:
    """Put the buffers of a :func:`snapshot_buffers` back (as the saved tensors themselves, so a buffer
    the step replaced by one of another shape, e.g. a grown memory, is restored too)."""
    with torch.no_grad():
        for owner, name, saved in snapshot:
            current = owner._buffers.get(name)
            if current is not None and current.shape == saved.shape and current.dtype == saved.dtype:
                current.copy_(saved)
            else:
                owner._buffers[name] = saved
