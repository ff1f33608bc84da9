"""Pruning of Optuna trials (``hydra.sweeper.pruner``): a trial's run reports each validation's ``val/R@1``
to its Optuna trial and stops when the study's pruner says so.

The sweeper (``hydra_plugins/ddtas_tpe_sweeper``) runs trials through a Hydra launcher, possibly in other
processes (submitit, SLURM), so the channel between the two is the study's storage, never a Python object:

* the sweeper stores the pruner's spec in the study (user attribute :data:`PRUNER_ATTR`) and passes each
  job ``optuna.storage=... optuna.study_name=... optuna.trial=<number>``;
* :class:`OptunaPruning` (a trainer callback, added by :func:`pruning_callbacks` when ``optuna.storage`` is
  set) opens that storage, rebuilds the pruner from the spec, and after every validation reports the
  monitored value at step = the number of validations so far (1, 2, ...: the "resource" the pruners'
  rungs count) and asks ``should_prune``. A pruned trial records the step in the trial's user attribute
  :data:`PRUNED_ATTR` and stops training (``trainer.should_stop``); ``train()`` then skips the test
  evaluation and writes ``metrics.json`` with ``"status": "pruned"`` and the compute spent;
* the sweeper reads :data:`PRUNED_ATTR` after the job and tells Optuna ``TrialState.PRUNED``.

Everything lives in the storage, so a resumed study (the same ``-m`` command and ``hydra.sweep.dir``) keeps
its intermediate values and pruning decisions, and a resumed trial (ckpt_path=last) its validation count
(the callback's state travels in checkpoints).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from ddtas_lightning.config.validation import ConfigError, as_int, check_choice

log = logging.getLogger(__name__)

PRUNER_ATTR = "ddtas:pruner"      # study user attribute: {"kind": ..., "options": {...}}
PRUNED_ATTR = "ddtas:pruned_at"   # trial user attribute: the step (validation number) it was pruned at
PRUNERS = ("none", "median", "successive_halving", "hyperband")
# The key options of each pruner (null: Optuna's default). Steps are validations (1, 2, ...).
PRUNER_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": (),
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
}
_MINIMUM = {"n_startup_trials": 0, "n_warmup_steps": 0, "interval_steps": 1, "n_min_trials": 1, "min_resource": 1,
            "max_resource": 1, "reduction_factor": 2, "min_early_stopping_rate": 0, "bootstrap_count": 0}


def pruner_spec(kind: Any, options: Any = None) -> dict:
    """The validated ``{"kind", "options"}`` of ``hydra.sweeper.pruner`` / ``pruner_options`` (unset options
    dropped). One ConfigError naming the key for an unknown pruner, an option the pruner does not take, or a
    value out of range."""
    kind = "none" if kind in (None, False) else kind
    check_choice("hydra.sweeper.pruner", kind, PRUNERS)
    given = {str(k): v for k, v in dict(options or {}).items() if v is not None}
    out: dict[str, int] = {}
    for key, value in sorted(given.items()):
        if key not in PRUNER_OPTIONS[kind]:
            takes = ", ".join(PRUNER_OPTIONS[kind]) or "none"
            raise ConfigError(f"hydra.sweeper.pruner_options.{key} is not an option of pruner={kind} (its options: "
                              f"{takes}); set it to null or choose a pruner that takes it")
        if key in ("min_resource", "max_resource") and value == "auto":
            out[key] = "auto"  # type: ignore[assignment]
            continue
        out[key] = as_int(f"hydra.sweeper.pruner_options.{key}", value, _MINIMUM[key])
    return {"kind": kind, "options": out}


def make_pruner(spec: dict):
    """The Optuna pruner of a :func:`pruner_spec`."""
    import optuna.pruners as p

    kind, options = spec["kind"], dict(spec.get("options") or {})
    if kind == "median":
        return p.MedianPruner(**options)
    if kind == "successive_halving":
        return p.SuccessiveHalvingPruner(**options)
    if kind == "hyperband":
        return p.HyperbandPruner(**options)
    return p.NopPruner()


def open_trial(storage_url: str, study_name: str, number: int):
    """``(study, trial)``: the study (with the pruner stored in it) and its trial ``number``, opened from the
    storage by name, as a process that did not create them can."""
    import optuna

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        raise ConfigError(f"optuna.study_name={study_name!r}: no such study in optuna.storage={storage_url!r} "
                          "(set by hydra/sweeper=tpe; a plain run leaves optuna.storage=null)") from None
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(0))
    study.pruner = make_pruner(study.user_attrs.get(PRUNER_ATTR) or {"kind": "none"})
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
    except KeyError:
        raise ConfigError(f"optuna.trial={number}: study {study_name!r} has no such trial") from None
    return study, optuna.trial.Trial(study, trial_id)


class OptunaPruning(pl.Callback):
    """Report ``monitor`` after every validation to Optuna trial ``trial`` and stop when it is pruned."""

    def __init__(self, storage: str, study_name: str, trial: int, monitor: str = "val/R@1") -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study_name, int(trial), monitor
        self.validations = 0
        self.pruned_at: int | None = None
        self._trial = None

    def _optuna_trial(self):
        if self._trial is None:
            _, self._trial = open_trial(self.storage, self.study_name, self.number)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not the validation train() adds after fit when the last step was not validated (runtime/run_end.py):
        # the trial has done all its training by then, and its value is what the sweeper reads.
        if trainer.sanity_checking or self.pruned_at is not None or trainer.state.fn != "fit":
            return
        self.validations += 1
        value = trainer.callback_metrics.get(self.monitor)
        prune = False
        if trainer.is_global_zero and value is not None:
            trial = self._optuna_trial()
            trial.report(float(value), self.validations)
            prune = trial.should_prune()
            if prune:
                trial.set_user_attr(PRUNED_ATTR, self.validations)
        if trainer.world_size > 1:  # every rank stops together
            prune = bool(trainer.strategy.broadcast(torch.tensor(int(prune)), src=0).item())
        if prune:
            self.pruned_at = self.validations
            trainer.should_stop = True
            log.warning("optuna: trial %d pruned at validation %d (%s %.4f): training stops", self.number,
                        self.validations, self.monitor, float(value) if value is not None else float("nan"))

    def state_dict(self) -> dict:
        return {"validations": self.validations, "pruned_at": self.pruned_at}

    def load_state_dict(self, state: dict) -> None:
        self.validations = int(state.get("validations", 0))
        self.pruned_at = state.get("pruned_at")

    def summary(self) -> dict | None:
        """``pruned`` of metrics.json (None: not pruned)."""
        if self.pruned_at is None:
            return None
        return {"at_validation": self.pruned_at, "trial": self.number, "study": self.study_name}


def pruning_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """``[OptunaPruning]`` when the run is a pruned sweep's trial (``optuna.storage`` set), else ``[]``."""
    node = cfg.get("optuna") or {}
    if not node.get("storage"):
        return []
    for key in ("study_name", "trial"):
        if node.get(key) is None:
            raise ConfigError(f"optuna.{key} must be set with optuna.storage (hydra/sweeper=tpe sets all three)")
    return [OptunaPruning(str(node.storage), str(node.study_name), as_int("optuna.trial", node.trial, 0))]
