"""``logger=wandb``: a Lightning ``WandbLogger`` set up so that a W&B dashboard compares a sweep's runs.

* group: the sweep (``<task_name>-<sweep dir name>``) in a multirun, else ``task_name``;
* tags: ``static`` or ``dynamic`` (the rule of :mod:`ddtas_lightning.report.kinds`), the threshold
  policy, the miner and the sweep arm (``arm:meta``), plus any configured ones;
* config: the resolved training config (the groups conf/logger/wandb.yaml passes in);
* the per-step curves (``train/lambda``, ``mining/ratio``, ``mining/tolerance``, ...) come from the
  module's ``log_dict`` like every other metric;
* mode: offline unless an API key is configured (``WANDB_API_KEY`` or a ``wandb login`` entry in
  ``~/.netrc``): runs are written to ``<run dir>/wandb/offline-run-*`` for a later ``wandb sync``.
  ``WANDB_MODE`` (online, offline, disabled) in the environment, or ``logger.wandb.mode``, wins.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from ddtas_lightning.report.kinds import class_name, run_kind

MODES = ("online", "offline", "disabled")


def has_api_key() -> bool:
    """An API key in the environment or stored by ``wandb login`` (``~/.netrc``, host api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    """The configured mode, else ``WANDB_MODE``, else online with an API key and offline without."""
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's old spellings
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode (or WANDB_MODE) must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _hydra_job() -> tuple[str | None, str | None, dict]:
    """(sweep dir name in a multirun else None, the job's override dirname, the group choices)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under a Hydra app (tests call train() directly)
        return None, None, {}
    multirun = hc.mode == RunMode.MULTIRUN
    return (Path(hc.sweep.dir).name if multirun else None,
            hc.job.override_dirname or None if multirun else None,
            dict(hc.runtime.choices))


def run_tags(config: dict, choices: dict, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``static``/``dynamic``, ``policy:<choice>``, ``miner:<choice>``, ``arm:<choice>`` and ``extra``."""
    policy_target = (config.get("threshold_policy") or {}).get("_target_")
    miner_target = (config.get("miner") or {}).get("_target_")
    tags = [run_kind(policy_target, miner_target),
            f"policy:{choices.get('threshold_policy') or class_name(policy_target)}",
            f"miner:{choices.get('miner') or class_name(miner_target)}"]
    if choices.get("arm"):
        tags.append(f"arm:{choices['arm']}")
    return list(dict.fromkeys([*tags, *extra]))  # unique, in order


def wandb_logger(
    config: dict,
    project: str = "ddtas-lightning",
    save_dir: str = ".",
    mode: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """Build the logger (``_target_`` of conf/logger/wandb.yaml; ``config`` is the resolved training config)."""
    import wandb

    # A sweep through the basic launcher runs every job in this one process; without this, the next
    # job's logger would attach to the previous job's (still open) run.
    if wandb.run is not None:
        wandb.finish()
    sweep, job_name, choices = _hydra_job()
    task = config.get("task_name") or "train"
    os.makedirs(save_dir, exist_ok=True)
    if "settings" not in kwargs and not sys.stderr.isatty():
        # Output that is not a terminal (a log file, SLURM): W&B's essential lines only (where the run is
        # saved), not its banner, run-history sparklines and footer.
        kwargs["settings"] = wandb.Settings(quiet=True)
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        offline=False,  # Lightning's offline=True rewrites WANDB_MODE for the whole process; mode= does not
        mode=resolve_mode(mode),
        group=group or (f"{task}-{sweep}" if sweep else task),
        name=name or job_name,
        tags=run_tags(config, choices, list(tags or ())),
        config=config,
        log_model=log_model,
        **kwargs,
    )
    # Lightning always passes `anonymous` (None when not asked for), which W&B >= 0.19 answers with
    # "WARNING The anonymous setting has no effect and will be removed" at every run: leave it out.
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


def finish_wandb(loggers) -> None:
    """Finish the W&B run of a training run that ended normally, while its output streams are the run's own:
    left to W&B's exit hook, its footer came out after the process's streams were taken down, on stdout,
    with its terminal colour codes."""
    for logger in loggers:
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None:
            run.finish()
