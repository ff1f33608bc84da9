"""A Hydra sweeper that runs an Optuna study (``hydra/sweeper=tpe``; the recipes are ``hparams_search=...``,
lightning-hydra-template's convention): TPE by default, or a grid (``sampler: grid``), optionally with a pruner.

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
* ``sampler: tpe`` (seeded, ``n_startup_trials`` random trials first: Optuna's default of 10 would leave
  a short study purely random) or ``sampler: grid`` (Optuna's GridSampler over ``choice``/``range``
  values: every point once, in an order shuffled by ``seed``);
* ``pruner: none | median | successive_halving | hyperband`` with ``pruner_options`` (their key options;
  null: Optuna's defaults): each trial's run reports its validation R@1 after every validation to its
  Optuna trial through the storage, and stops when pruned (``ddtas_lightning/runtime/pruning.py``); a
  pruned trial is told ``TrialState.PRUNED`` and counts as finished;
* persistent storage: ``storage`` (default ``sqlite:///<sweep dir>/optuna.db``); re-running the same
  command with the same ``hydra.sweep.dir`` continues the study up to ``n_trials`` finished (complete or
  pruned) trials;
* one sweeper per sweep dir: an exclusive lock (``<sweep dir>/.sweep.lock``, ``flock``: released by the OS
  however the process ends) held for the sweep's life; a second sweeper on the same dir stops with one
  ``error:`` line naming the dir and the holder. Trials left RUNNING are marked stale (FAIL) only by the
  lock's holder, so only when the sweeper that ran them is dead (a trial recorded as another sweep dir's
  is left alone while that dir's lock is held); a stale trial's parameters run again as the next trial;
* resume = the same sequence: for TPE the sampler is re-seeded before every draw from (``seed``, the
  number of trials in the study that are not stale), so a resumed study draws what an uninterrupted one
  would have, given the same results: stopped between trials, or killed mid-trial (whose parameters run
  again). Guaranteed for ``batch_size: 1``; with larger batches the same points are drawn but not proven
  in the same order. Grid: every point runs once (an abandoned one again), the order may shift;
* ``<sweep dir>/optuna.json``: the study (sampler, seed, pruner, search space) and every trial (number,
  params, value, state, intermediate values, job dir) for ``python -m ddtas_lightning.compare``.

Bad sweeper settings (an interval with low > high, a pruner option the pruner does not take, a dir in
use, ...) are one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.config.validation import ConfigError, check_choice

log = logging.getLogger(__name__)
STUDY_FILE = "optuna.json"
LOCK_FILE = ".sweep.lock"
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "grid")
# Trial user attributes this sweeper writes.
SWEEP_DIR_ATTR = "ddtas:sweep_dir"  # the sweep dir whose sweeper runs the trial (its lock says if it is alive)
STALE_ATTR = "ddtas:stale"          # left RUNNING by a dead sweeper, marked FAIL at a resume
RERUN_ATTR = "ddtas:rerun_of"       # the stale trial whose parameters this trial runs again


def _distribution(override: Override):
    """An Optuna distribution for one sweep override (None: a fixed value)."""
    import optuna.distributions as d

    key = override.get_key_element()
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if sweep.start > sweep.end:
            raise ConfigError(f"hydra.sweeper.params.{key}: interval({sweep.start}, {sweep.end}) has low > high; "
                              f"write interval({sweep.end}, {sweep.start})")
        if log_scale and sweep.start <= 0:
            raise ConfigError(f"hydra.sweeper.params.{key}: tag(log, interval({sweep.start}, {sweep.end})) needs "
                              "low > 0 on a log scale")
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return d.IntDistribution(sweep.start, sweep.end, log=log_scale)
        return d.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if not values:
            raise ConfigError(f"hydra.sweeper.params.{key}: range({sweep.start}, {sweep.stop}, {sweep.step}) is "
                              "empty; use start < stop with a positive step")
        if all(isinstance(x, int) for x in (sweep.start, sweep.stop, sweep.step)):
            return d.IntDistribution(values[0], values[-1], step=sweep.step)
        return d.CategoricalDistribution([float(v) for v in values])
    if isinstance(sweep, ChoiceSweep):
        return d.CategoricalDistribution([str(x) if not isinstance(x, int | float | bool) else x
                                          for x in sweep.list])
    raise ConfigError(f"hydra/sweeper=tpe: {key}: unsupported sweep {sweep!r}; use interval(a, b), "
                      "tag(log, interval(a, b)), range(a, b, step) or choice(x, y, ...)")


def _grid_values(key: str, dist) -> list:
    """The grid points of one parameter (sampler: grid): the values of a choice or a range."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, d.IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    raise ConfigError(f"hydra.sweeper.params.{key}: sampler=grid needs a finite set of values, choice(x, y, ...) "
                      "or range(a, b, step), not an interval")


def _quote(value: str) -> str:
    """A Hydra override value quoted as one string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def derived_seed(seed: int, draw: int) -> int:
    """The sampler seed of draw number ``draw`` of a study seeded ``seed`` (independent streams)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(draw)]).generate_state(1)[0])


def _grid_sampler_class():
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """Optuna's GridSampler, minus its ``study.stop()`` when the grid is done (which only works inside
        ``study.optimize``; under ask-and-tell it raises): the sweep loop stops on ``is_exhausted``."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return AskTellGridSampler


def _GridSampler(search_space: dict, seed: int):  # noqa: N802 (a class factory: optuna imported lazily)
    return _grid_sampler_class()(search_space, seed=seed)


class SweepLock:
    """An exclusive ``flock`` on ``<sweep dir>/.sweep.lock`` naming its holder (pid and host)."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = Path(sweep_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(
                    f"hydra.sweep.dir: {self.path.parent} is in use by another sweep ({holder or 'a live process'} "
                    f"holds {self.path}); two sweepers on one study would fail each other's running trials. Wait "
                    "for it to end, or choose another hydra.sweep.dir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def held(sweep_dir: str | Path) -> bool:
        """Whether a live process holds the lock of ``sweep_dir`` (probed without keeping it)."""
        path = Path(sweep_dir) / LOCK_FILE
        if not path.is_file():
            return False
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing releases a lock the probe took
        return False


class TPESweeper(Sweeper):
    def __init__(self, n_trials: int, seed: int = 0, direction: str = "maximize", storage: str | None = None,
                 study_name: str | None = None, n_startup_trials: int = 3, batch_size: int = 1,
                 params: dict[str, str] | None = None, sampler: str = "tpe", pruner: str | None = "none",
                 pruner_options: dict[str, Any] | None = None) -> None:
        self.n_trials, self.seed, self.direction = n_trials, seed, direction
        self.storage, self.study_name = storage, study_name
        self.n_startup_trials, self.batch_size = n_startup_trials, batch_size
        self.params = dict(params or {})
        self.sampler_kind, self.pruner = sampler, pruner
        self.pruner_options = dict(pruner_options or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ---- settings -----------------------------------------------------------------------------------
    def _check_settings(self) -> dict:
        """The sweeper's own settings, checked (ConfigError naming the key); returns the pruner spec."""
        from ddtas_lightning.config.validation import as_int
        from ddtas_lightning.runtime.pruning import pruner_spec

        check_choice("hydra.sweeper.direction", self.direction, DIRECTIONS)
        check_choice("hydra.sweeper.sampler", self.sampler_kind, SAMPLERS)
        self.n_trials = as_int("hydra.sweeper.n_trials", self.n_trials, 1)
        self.batch_size = as_int("hydra.sweeper.batch_size", self.batch_size, 1)
        self.n_startup_trials = as_int("hydra.sweeper.n_startup_trials", self.n_startup_trials, 0)
        self.seed = as_int("hydra.sweeper.seed", self.seed, 0)
        return pruner_spec(self.pruner, self.pruner_options)

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        loader = getattr(self.hydra_context, "config_loader", None)
        parser = OverridesParser.create(config_loader=loader)
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
            raise ConfigError("hydra/sweeper=tpe: nothing to search; set hydra.sweeper.params, e.g. "
                              "'loss.threshold: interval(0.1, 0.9)'")
        return space, fixed

    def _make_sampler(self, space: dict, draw: int = 0):
        import optuna

        if self.sampler_kind == "grid":
            return _GridSampler({k: _grid_values(k, v) for k, v in space.items()}, seed=self.seed)
        return optuna.samplers.TPESampler(seed=derived_seed(self.seed, draw), n_startup_trials=self.n_startup_trials)

    # ---- the sweep ----------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except ConfigError as exc:  # one line, as train's bad inputs (exit 2)
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    def _sweep(self, arguments: list[str]) -> list:
        spec = self._check_settings()
        space, fixed = self._space(arguments)
        if self.sampler_kind == "grid":  # checked before the lock: every parameter a finite set
            for key, dist in space.items():
                _grid_values(key, dist)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        lock = SweepLock(sweep_dir).acquire()  # before anything in the dir is touched
        try:
            return self._run_study(sweep_dir, space, fixed, spec)
        finally:
            lock.release()

    def _open_study(self, sweep_dir: Path, space: dict, spec: dict):
        import optuna

        from ddtas_lightning.runtime.pruning import PRUNER_ATTR, make_pruner

        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        name = self.study_name or f"{self.config.get('task_name', 'study')}-seed{self.seed}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=name, storage=storage, direction=self.direction, load_if_exists=True,
                                    sampler=self._make_sampler(space), pruner=make_pruner(spec))
        before = study.user_attrs.get(PRUNER_ATTR)
        if before is not None and before != spec:
            raise ConfigError(
                f"hydra.sweeper.pruner: the study {name!r} in {storage} was started with pruner {before['kind']} "
                f"{before.get('options') or ''}, not {spec['kind']} {spec['options'] or ''}; resume it with the same "
                "hydra.sweeper.pruner and pruner_options, or start a new study (another hydra.sweep.dir)")
        study.set_user_attr(PRUNER_ATTR, spec)  # the trials' runs rebuild the pruner from it
        return study, storage

    def _mark_stale(self, study, sweep_dir: Path) -> None:
        """Trials left RUNNING by a dead sweeper: FAIL (marked stale), their parameters queued to run again.
        Only this dir's lock holder (us) decides for this dir's trials; a trial of another sweep dir sharing
        the storage is left alone while that dir's lock is held."""
        import optuna

        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            owner = stale.user_attrs.get(SWEEP_DIR_ATTR, str(sweep_dir))
            if owner != str(sweep_dir) and SweepLock.held(owner):
                log.info("trial %d is running in the live sweep %s: left alone", stale.number, owner)
                continue
            study._storage.set_trial_user_attr(stale._trial_id, STALE_ATTR, True)
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d was left running by a sweep that is gone: marked failed (stale); its parameters "
                        "run again as a new trial (job dir %s kept)", stale.number, sweep_dir / str(stale.number))
            if stale.params:
                study.enqueue_trial(stale.params, user_attrs={RERUN_ATTR: stale.number})

    def _ask(self, study, space: dict, sweep_dir: Path):
        """One trial: a queued re-run first, else a draw from a sampler seeded by the draw number."""
        if self.sampler_kind == "tpe":
            draw = sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(STALE_ATTR))
            study.sampler = self._make_sampler(space, draw)
        trial = study.ask(space)
        trial.set_user_attr(SWEEP_DIR_ATTR, str(sweep_dir))
        return trial

    def _more(self, study) -> int:
        """How many more trials to start (0: the study is done)."""
        import optuna

        todo = self.n_trials - self._finished(study)
        if todo <= 0:
            return 0
        if self.sampler_kind == "grid":
            waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if not waiting and study.sampler.is_exhausted(study):
                return 0
            if not waiting:  # never past the grid's last unvisited point
                todo = min(todo, len(study.sampler._get_unvisited_grid_ids(study)))
        return todo

    def _run_study(self, sweep_dir: Path, space: dict, fixed: list[str], spec: dict) -> list:
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study, storage = self._open_study(sweep_dir, space, spec)
        self._mark_stale(study, sweep_dir)
        pruning = spec["kind"] != "none"
        returns = []
        while (todo := self._more(study)) > 0:
            trials = [self._ask(study, space, sweep_dir) for _ in range(min(self.batch_size, todo))]
            for group in self._consecutive(trials):
                jobs = [[*fixed, *(f"{k}={v}" for k, v in t.params.items()),
                         *([f"optuna.storage={_quote(storage)}", f"optuna.study_name={_quote(study.study_name)}",
                            f"optuna.trial={t.number}"] if pruning else [])] for t in group]
                results = self.launcher.launch(jobs, initial_job_idx=group[0].number)
                for trial, result in zip(group, results):
                    self._tell(study, trial, result)
                returns.append(results)
            self._write_summary(study, sweep_dir, space, storage, spec)
        self._write_summary(study, sweep_dir, space, storage, spec)
        return returns

    @staticmethod
    def _consecutive(trials: list) -> list[list]:
        """Trials in runs of consecutive numbers (a launch numbers its jobs from its first trial's number)."""
        groups: list[list] = []
        for t in sorted(trials, key=lambda t: t.number):
            if groups and t.number == groups[-1][-1].number + 1:
                groups[-1].append(t)
            else:
                groups.append([t])
        return groups

    def _tell(self, study, trial, result) -> None:
        import optuna

        from ddtas_lightning.runtime.pruning import PRUNED_ATTR

        TrialState = optuna.trial.TrialState
        frozen = study._storage.get_trial(trial._trial_id)
        value = self._objective(result)
        if frozen.state != TrialState.RUNNING:  # not ours any more (only possible without the lock)
            log.warning("trial %d was already finished as %s elsewhere; its result (%s) stays in its job dir",
                        trial.number, frozen.state.name, value)
            return
        if result.status == JobStatus.COMPLETED and frozen.user_attrs.get(PRUNED_ATTR) is not None:
            study.tell(trial, state=TrialState.PRUNED)  # value: its last reported validation R@1
            log.info("trial %d %s -> pruned at validation %s", trial.number, trial.params,
                     frozen.user_attrs[PRUNED_ATTR])
            return
        if value is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
        log.info("trial %d %s -> %s", trial.number, trial.params, value)

    @staticmethod
    def _finished(study) -> int:
        """Trials finished with a decision: complete or pruned."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    @staticmethod
    def _objective(result) -> float | None:
        if result.status != JobStatus.COMPLETED:
            return None
        try:
            value = float(result.return_value)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(value) else value

    def _write_summary(self, study, sweep_dir: Path, space: dict, storage: str, spec: dict) -> None:
        trials = [{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name,
                   "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                   "stale": bool(t.user_attrs.get(STALE_ATTR)), "rerun_of": t.user_attrs.get(RERUN_ATTR),
                   "job_dir": str(sweep_dir / str(t.number))} for t in study.get_trials(deepcopy=False)]
        payload = {"study_name": study.study_name, "storage": storage,
                   "sampler": "Grid" if self.sampler_kind == "grid" else "TPE", "seed": self.seed,
                   "n_startup_trials": self.n_startup_trials, "direction": self.direction, "pruner": spec,
                   "objective": "the task function's return value (train.py: best validation R@1)",
                   "space": {k: repr(v) for k, v in space.items()}, "n_trials": self.n_trials, "trials": trials}
        tmp = sweep_dir / (STUDY_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        tmp.replace(sweep_dir / STUDY_FILE)
