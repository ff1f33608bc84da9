"""How a command ends: bad input is one ``error:`` line (exit 2), a diverged run exit 3, a bug its traceback.

Shared by every entry point (``train``, ``evaluate``), so neither imports the other.
"""

from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode

from ddtas_lightning.config.validation import ConfigError

log = logging.getLogger(__name__)


def root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def exit_code_for(exc: BaseException) -> int | None:
    """How the CLI ends for ``exc``: 2 = bad input (one ``error:`` line), 3 = training diverged
    (non-finite guard; the message names the checkpoint), None = a bug (re-raised with its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ddtas_lightning.data.records import DatasetLayoutError
    from ddtas_lightning.module import NonFiniteLossError

    cause = root_cause(exc)
    # MisconfigurationException: Lightning's own verdict on trainer.* values (devices=0, ...).
    bad_input = ConfigError | DatasetLayoutError | FileNotFoundError | MisconfigurationException
    if isinstance(cause, bad_input) or (isinstance(cause, ValueError) and cause is not exc):
        return 2
    if isinstance(cause, NonFiniteLossError):
        return 3
    return None


def to_log_files(message: str) -> None:
    """``message`` into the run's log files only (Hydra's job log), not a second time on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under a Hydra app
        return []


def in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under a Hydra app
        return False
