"""A Hydra sweeper that runs an Optuna TPE search (``hydra/sweeper=tpe``; the recipes are
``hparams_search=...``, lightning-hydra-template's convention).

Why not hydra-optuna-sweeper: its last release (1.3.0) requires optuna < 3, and optuna 2.10's
database storage fails against the SQLAlchemy 2 that the rest of the environment installs (its
schema check asserts on a missing version row), so a persistent, resumable study is impossible with
it here. This sweeper drives a current Optuna instead and keeps everything else Hydra's: the config
is composed as for any multirun, each trial is one job of the configured launcher (basic,
submitit_local, slurm) in ``<sweep dir>/<trial number>/`` with its ``.hydra/`` and ``metrics.json``,
and the task function's return value (train.py: the best *validation* R@1) is the objective.

* search space: ``hydra.sweeper.params`` (and command-line overrides using the same syntax), in
  Hydra's sweep grammar: ``interval(a, b)`` (uniform float; ints give an int), ``tag(log, interval(a,
  b))`` (log scale), ``range(a, b, step)`` (ints or floats on a grid), ``choice(x, y, ...)``
  (categorical); plain values are fixed overrides of every trial;
* TPE sampler seeded (``seed``), ``n_startup_trials`` random trials first (Optuna's default of 10
  would leave a short study purely random);
* persistent storage: ``storage`` (default ``sqlite:///<sweep dir>/optuna.db``); re-running the same
  command with the same ``hydra.sweep.dir`` continues the study up to ``n_trials`` finished trials
  (trials left RUNNING by a killed sweep are marked failed, and their job dirs reported as such);
* ``<sweep dir>/optuna.json``: the study (sampler, seed, search space) and every trial (number,
  params, value, state, job dir) for ``python -m ddtas_lightning.compare``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
STUDY_FILE = "optuna.json"
DIRECTIONS = ("maximize", "minimize")


def _distribution(override: Override):
    """An Optuna distribution for one sweep override (None: a fixed value)."""
    import optuna.distributions as d

    key = override.get_key_element()
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return d.IntDistribution(sweep.start, sweep.end, log=log_scale)
        return d.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    if isinstance(sweep, RangeSweep):
        if all(isinstance(x, int) for x in (sweep.start, sweep.stop, sweep.step)):
            return d.IntDistribution(sweep.start, sweep.stop - 1, step=sweep.step)
        values = list(sweep.range())
        return d.CategoricalDistribution([float(v) for v in values])
    if isinstance(sweep, ChoiceSweep):
        return d.CategoricalDistribution([str(x) if not isinstance(x, int | float | bool) else x
                                          for x in sweep.list])
    raise HydraException(f"hydra/sweeper=tpe: {key}: unsupported sweep {sweep!r}; use interval(a, b), "
                         "tag(log, interval(a, b)), range(a, b, step) or choice(x, y, ...)")


class TPESweeper(Sweeper):
    def __init__(self, n_trials: int, seed: int = 0, direction: str = "maximize", storage: str | None = None,
                 study_name: str | None = None, n_startup_trials: int = 3, batch_size: int = 1,
                 params: dict[str, str] | None = None) -> None:
        if direction not in DIRECTIONS:
            raise HydraException(f"hydra.sweeper.direction must be one of {DIRECTIONS}, got {direction!r}")
        if int(n_trials) < 1 or int(batch_size) < 1:
            raise HydraException(f"hydra.sweeper.n_trials ({n_trials}) and batch_size ({batch_size}) must be >= 1")
        self.n_trials, self.seed, self.direction = int(n_trials), int(seed), direction
        self.storage, self.study_name = storage, study_name
        self.n_startup_trials, self.batch_size = int(n_startup_trials), int(batch_size)
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        merged = {**{k: f"{k}={v}" for k, v in self.params.items()},
                  **{o.split("=", 1)[0]: o for o in arguments}}  # the command line wins
        space, fixed = {}, []
        for override in parser.parse_overrides(list(merged.values())):
            dist = _distribution(override)
            if dist is None:
                fixed.append(override.input_line)
            else:
                space[override.get_key_element()] = dist
        if not space:
            raise HydraException("hydra/sweeper=tpe: nothing to search; set hydra.sweeper.params, e.g. "
                                 "'loss.threshold: interval(0.1, 0.9)'")
        return space, fixed

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        space, fixed = self._space(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        name = self.study_name or f"{self.config.get('task_name', 'study')}-seed{self.seed}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=name, storage=storage, direction=self.direction, load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials),
        )
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # a killed sweep's trial
        returns = []
        while (done := self._finished(study)) < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.batch_size, self.n_trials - done))]
            jobs = [[*fixed, *(f"{k}={v}" for k, v in t.params.items())] for t in trials]
            results = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
            for trial, result in zip(trials, results):
                value = self._objective(result)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
                log.info("trial %d %s -> %s", trial.number, trial.params, value)
            returns.append(results)
            self._write_summary(study, sweep_dir, space, storage)
        self._write_summary(study, sweep_dir, space, storage)
        return returns

    @staticmethod
    def _finished(study) -> int:
        import optuna

        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    @staticmethod
    def _objective(result) -> float | None:
        if result.status != JobStatus.COMPLETED:
            return None
        try:
            value = float(result.return_value)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(value) else value

    def _write_summary(self, study, sweep_dir: Path, space: dict, storage: str) -> None:
        trials = [{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name,
                   "job_dir": str(sweep_dir / str(t.number))} for t in study.get_trials(deepcopy=False)]
        payload = {"study_name": study.study_name, "storage": storage, "sampler": "TPE", "seed": self.seed,
                   "n_startup_trials": self.n_startup_trials, "direction": self.direction,
                   "objective": "the task function's return value (train.py: best validation R@1)",
                   "space": {k: repr(v) for k, v in space.items()}, "n_trials": self.n_trials, "trials": trials}
        tmp = sweep_dir / (STUDY_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        tmp.replace(sweep_dir / STUDY_FILE)
