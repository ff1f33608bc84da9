"""hydra/sweeper=tpe (hydra_plugins/ddtas_tpe_sweeper): one sweeper per sweep dir (a lock; stale trials only
without a live holder), a resumed study continues the uninterrupted sequence, pruning decisions on hand-made
curves through the storage (the path a trial's run takes), the pruning callback stopping a real run, the
SIGTERM hint of a study's trial, and a tiny end-to-end grid + successive-halving sweep (slow).

The sweeper runs here in-process with a fake launcher (a job = a deterministic function of its parameters),
so the Optuna side (storage, sampler, pruner) is the real one and a test takes a second or two."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from ddtas_lightning.runtime.pruning import PRUNED_ATTR, PRUNER_ATTR, OptunaPruning, make_pruner, pruner_spec
from hydra_plugins.ddtas_tpe_sweeper.tpe_sweeper import (
    RERUN_ATTR,
    STALE_ATTR,
    SWEEP_DIR_ATTR,
    SweepLock,
    TPESweeper,
)
from tests.conftest import TINY_DATA, compose_train

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"arm": "lambda_0.7", "loss.threshold": "interval(0.1, 0.95)", "miner.margin": "interval(0.02, 0.3)"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective(params: dict) -> float:
    return 1.0 - (float(params["loss.threshold"]) - 0.6) ** 2 - (float(params["miner.margin"]) - 0.1) ** 2


class FakeLauncher:
    """Runs a job as ``objective(params)``; ``hook(number, params)`` first (to start a rival or to die)."""

    def __init__(self, hook=None) -> None:
        self.hook, self.jobs = hook, []

    def launch(self, job_overrides, initial_job_idx: int):
        out = []
        for i, overrides in enumerate(job_overrides):
            params = dict(o.split("=", 1) for o in overrides)
            self.jobs.append((initial_job_idx + i, params))
            if self.hook is not None:
                self.hook(initial_job_idx + i, params)
            out.append(SimpleNamespace(status=JobStatus.COMPLETED, return_value=objective(params)))
        return out


def sweeper(sweep_dir: Path, n_trials: int, launcher: FakeLauncher | None = None, **kw) -> TPESweeper:
    s = TPESweeper(n_trials=n_trials, seed=kw.pop("seed", 0), params=kw.pop("params", PARAMS),
                   n_startup_trials=kw.pop("n_startup_trials", 3), **kw)
    s.config = OmegaConf.create({"task_name": "t", "hydra": {"sweep": {"dir": str(sweep_dir)}}})
    s.launcher = launcher or FakeLauncher()
    return s


def trials_of(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "optuna.json").read_text())["trials"]


def point(trial: dict) -> tuple:
    return trial["params"]["loss.threshold"], trial["params"]["miner.margin"]


# ---- item 7: one sweeper per sweep dir -----------------------------------------------------------------------
def test_a_second_sweeper_on_the_dir_refuses_and_the_first_keeps_its_results(tmp_path, capsys):
    """Without the lock the second sweeper marked the first's running trial FAIL at start-up, and the first
    then crashed telling it (``Cannot tell a FAIL trial``), losing its finished result."""
    rival = {}

    def start_a_rival(number, params):
        if number == 0:
            with pytest.raises(SystemExit) as exit_info:
                sweeper(tmp_path, 2).sweep([])
            rival["code"] = exit_info.value.code

    sweeper(tmp_path, 2, FakeLauncher(start_a_rival)).sweep([])
    assert rival["code"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: hydra.sweep.dir: {tmp_path} is in use by another sweep (pid {os.getpid()} on "
                   f"{os.uname().nodename} holds {tmp_path / '.sweep.lock'}); two sweepers on one study would fail "
                   "each other's running trials. Wait for it to end, or choose another hydra.sweep.dir"]
    trials = trials_of(tmp_path)
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [t["value"] for t in trials] == [pytest.approx(objective(t["params"])) for t in trials]


def test_a_sweeper_in_another_process_holds_the_dir_until_it_dies(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hydra_plugins.ddtas_tpe_sweeper.tpe_sweeper import SweepLock\n"
         "SweepLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit):
            sweeper(tmp_path, 1).sweep([])
        assert f"(pid {holder.pid} on {os.uname().nodename} holds" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    sweeper(tmp_path, 1).sweep([])  # the OS released the dead holder's lock: no stale lock file blocks
    assert [t["state"] for t in trials_of(tmp_path)] == ["COMPLETE"]


def test_running_trials_are_stale_only_without_a_live_holder(tmp_path):
    """A study shared by two sweep dirs (one storage): a RUNNING trial of the other dir is left alone while
    that dir's lock is held, and marked stale (FAIL, its parameters run again) once it is not."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    other = tmp_path / "other"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    running = study.ask({"loss.threshold": optuna.distributions.FloatDistribution(0.1, 0.95),
                         "miner.margin": optuna.distributions.FloatDistribution(0.02, 0.3)})
    running.set_user_attr(SWEEP_DIR_ATTR, str(other))
    live = SweepLock(other).acquire()
    try:
        sweeper(tmp_path / "mine", 1, storage=storage, study_name="s").sweep([])
        assert study.trials[running.number].state == optuna.trial.TrialState.RUNNING
    finally:
        live.release()
    sweeper(tmp_path / "mine", 2, storage=storage, study_name="s").sweep([])
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert trials[running.number].state == optuna.trial.TrialState.FAIL
    assert trials[running.number].user_attrs[STALE_ATTR] is True
    rerun = [t for t in trials if t.user_attrs.get(RERUN_ATTR) == running.number]
    assert len(rerun) == 1 and rerun[0].params == running.params and rerun[0].state.name == "COMPLETE"


# ---- item 8: a resumed study continues the sequence ---------------------------------------------------------
def test_a_resumed_study_draws_what_an_uninterrupted_one_draws(tmp_path):
    """Stopped after 2 trials and resumed to 4: trials 0-1 unchanged, 4 distinct points, and the same 4
    points as the uninterrupted study (n_startup_trials=3: a restarted sampler gave trials 2 and 3 the
    points of 0 and 1)."""
    sweeper(tmp_path / "whole", 4).sweep([])
    whole = [point(t) for t in trials_of(tmp_path / "whole")]

    sweeper(tmp_path / "resumed", 2).sweep([])
    first = [point(t) for t in trials_of(tmp_path / "resumed")]
    sweeper(tmp_path / "resumed", 4).sweep([])  # a new sweeper: the same command again
    resumed = trials_of(tmp_path / "resumed")
    assert [t["number"] for t in resumed] == [0, 1, 2, 3] and all(t["state"] == "COMPLETE" for t in resumed)
    assert [point(t) for t in resumed[:2]] == first
    assert len({point(t) for t in resumed}) == 4
    assert [point(t) for t in resumed] == whole


def test_a_study_killed_mid_trial_reruns_that_point_and_continues_the_sequence(tmp_path):
    sweeper(tmp_path / "whole", 4, n_startup_trials=2).sweep([])
    whole = [point(t) for t in trials_of(tmp_path / "whole")]

    def die_in_trial_2(number, params):
        if number == 2:
            raise KeyboardInterrupt  # the sweep process dies with trial 2 running (its lock goes with it)

    with pytest.raises(KeyboardInterrupt):
        sweeper(tmp_path / "killed", 4, FakeLauncher(die_in_trial_2), n_startup_trials=2).sweep([])
    sweeper(tmp_path / "killed", 4, n_startup_trials=2).sweep([])
    trials = trials_of(tmp_path / "killed")
    assert [(t["number"], t["state"], t["stale"], t["rerun_of"]) for t in trials] == [
        (0, "COMPLETE", False, None), (1, "COMPLETE", False, None), (2, "FAIL", True, None),
        (3, "COMPLETE", False, 2), (4, "COMPLETE", False, None)]
    assert point(trials[3]) == point(trials[2])  # the abandoned point ran again
    assert [point(t) for t in trials if not t["stale"]] == whole


def test_a_grid_study_runs_every_point_once_and_an_abandoned_point_again(tmp_path):
    grid = {"arm": "lambda_0.7", "loss.threshold": "choice(0.1, 0.3, 0.5, 0.7, 0.9)", "miner.margin": "0.1"}

    def die_in_trial_2(number, params):
        if number == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweeper(tmp_path, 10, FakeLauncher(die_in_trial_2), params=grid, sampler="grid").sweep([])
    sweeper(tmp_path, 10, params=grid, sampler="grid").sweep([])  # n_trials 10 > 5 points: the grid ends it
    done = [t for t in trials_of(tmp_path) if t["state"] == "COMPLETE"]
    assert sorted(t["params"]["loss.threshold"] for t in done) == [0.1, 0.3, 0.5, 0.7, 0.9]


def test_bad_sweeper_settings_are_one_error_line(tmp_path, capsys):
    for kw, message in (
        ({"params": {**PARAMS, "loss.threshold": "interval(0.9, 0.1)"}},
         "error: hydra.sweeper.params.loss.threshold: interval(0.9, 0.1) has low > high; write interval(0.1, 0.9)"),
        ({"pruner": "median", "pruner_options": {"reduction_factor": 2}},
         "error: hydra.sweeper.pruner_options.reduction_factor is not an option of pruner=median (its options: "
         "n_startup_trials, n_warmup_steps, interval_steps, n_min_trials)"),
        ({"pruner": "asha"}, "error: hydra.sweeper.pruner must be one of ('none', 'median', 'successive_halving', "
                             "'hyperband'), got 'asha'"),
        ({"sampler": "grid"}, "error: hydra.sweeper.params.loss.threshold: sampler=grid needs a finite set of values"),
    ):
        with pytest.raises(SystemExit) as info:
            sweeper(tmp_path, 1, **kw).sweep([])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was touched


def test_resuming_with_another_pruner_is_refused(tmp_path, capsys):
    sweeper(tmp_path, 1, pruner="median").sweep([])
    with pytest.raises(SystemExit):
        sweeper(tmp_path, 2, pruner="successive_halving").sweep([])
    assert "was started with pruner median" in capsys.readouterr().err


# ---- task B: pruning decisions on hand-made curves, through the storage ----------------------------------------
def run_curves(tmp_path: Path, spec: dict, curves: list[list[float]]) -> list[tuple[str, int | None, float]]:
    """Each curve (validation R@1 after validations 1, 2, ...) as one trial, in order, the way a sweep runs
    them: the trial's run reports through :class:`OptunaPruning` (a fake trainer; the storage is real) and
    stops when pruned; the sweeper tells the outcome. Returns (state, pruned at, value) per trial."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", pruner=make_pruner(spec))
    study.set_user_attr(PRUNER_ATTR, spec)
    owner = sweeper(tmp_path, len(curves))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for curve in curves:
        trial = study.ask(dist)
        callback = OptunaPruning(storage, "s", trial.number)
        trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, world_size=1, should_stop=False,
                                  state=SimpleNamespace(fn="fit"))
        for value in curve:
            trainer.callback_metrics = {"val/R@1": torch.tensor(value)}
            callback.on_validation_end(trainer, None)
            if trainer.should_stop:
                break
        owner._tell(study, trial, SimpleNamespace(status=JobStatus.COMPLETED, return_value=max(curve)))
    return [(t.state.name, t.user_attrs.get(PRUNED_ATTR), t.value) for t in study.trials]


def test_median_pruning_decisions(tmp_path):
    spec = pruner_spec("median", {"n_startup_trials": 2, "n_warmup_steps": 2})
    got = run_curves(tmp_path, spec, [
        [0.50, 0.60, 0.70],
        [0.20, 0.25, 0.30],  # worse everywhere, but only 1 trial completed before it (n_startup_trials=2)
        [0.10, 0.60, 0.65],  # step 1 is below everyone, but steps < n_warmup_steps=2 are never pruned;
                             # step 2: best 0.60 >= median(0.60, 0.25) = 0.425; step 3: 0.65 >= median(0.70, 0.30)
        [0.55, 0.30, 0.35],  # step 2: best so far 0.55 < median(0.60, 0.25, 0.60) = 0.60 -> pruned at 2
        [0.90, 0.90, 0.90],
    ])
    assert got == [("COMPLETE", None, 0.70), ("COMPLETE", None, 0.30), ("COMPLETE", None, 0.65),
                   ("PRUNED", 2, pytest.approx(0.30)), ("COMPLETE", None, 0.90)]


def test_successive_halving_decisions(tmp_path):
    # rungs at validations 1, 2, 4 (min_resource 1, reduction_factor 2): a trial goes on when its value is at
    # least the top 1/2 (at least the best, with fewer than 2 values) of the values that reached the rung
    spec = pruner_spec("successive_halving", {"min_resource": 1, "reduction_factor": 2})
    got = run_curves(tmp_path, spec, [
        [0.50, 0.60, 0.60, 0.70],  # alone at every rung: goes on
        [0.40, 0.90, 0.90, 0.90],  # rung 0: {0.5, 0.4}: needs >= 0.5 -> pruned at 1 (its later 0.9 never runs)
        [0.55, 0.50, 0.90, 0.90],  # rung 0: {0.5, 0.4, 0.55}: needs >= 0.55, ok; rung 1: {0.6, 0.5}: pruned at 2
        [0.60, 0.65, 0.60, 0.80],  # rung 0: 4 values, top 2 from 0.55: ok; rung 1: {0.6, 0.5, 0.65}: ok; rung 2 ok
    ])
    assert got == [("COMPLETE", None, 0.70), ("PRUNED", 1, pytest.approx(0.40)), ("PRUNED", 2, pytest.approx(0.50)),
                   ("COMPLETE", None, 0.80)]


def test_hyperband_decisions(tmp_path):
    # min_resource 1, max_resource 4, reduction_factor 2: floor(log2(4)) + 1 = 3 brackets with trial budgets
    # ceil(3 * 2**s / (s + 1)) for s = 2, 1, 0: 4, 3, 3 (of 10). Trial n goes to the bracket of
    # crc32("<study>_<n>") % 10 ([0, 4): 0, [4, 7): 1, [7, 10): 2): here trials 0-3 and 6 to bracket 0 (successive
    # halving from rung 1: rungs at validations 1, 2, 4), 4 and 5 to bracket 2 (its first rung is validation 4).
    # A trial competes only with the trials of its own bracket.
    import binascii

    budgets, brackets = [4, 3, 3], []
    for n in range(7):
        m = binascii.crc32(f"s_{n}".encode()) % sum(budgets)
        brackets.append(0 if m < 4 else 1 if m < 7 else 2)
    assert brackets == [0, 0, 0, 0, 2, 2, 0]
    spec = pruner_spec("hyperband", {"min_resource": 1, "max_resource": 4, "reduction_factor": 2})
    got = run_curves(tmp_path, spec, [
        [0.50, 0.60, 0.60, 0.70],  # bracket 0, alone: goes on
        [0.40, 0.90, 0.90, 0.90],  # bracket 0, rung 1: {0.5, 0.4}: needs the best -> pruned at 1
        [0.55, 0.50, 0.90, 0.90],  # bracket 0: rung 1 ok (the best of 3), rung 2: {0.6, 0.5}: pruned at 2
        [0.60, 0.65, 0.60, 0.80],  # bracket 0: rung 1 top 2 of 4, rung 2 {0.6, 0.5, 0.65}: best, rung 4 alone: on
        [0.10, 0.10, 0.10, 0.10],  # bracket 2: worst of all at validation 1, but bracket 2 decides at 4 only,
                                   # and there it is alone: complete (plain halving would stop it at 1)
        [0.05, 0.05, 0.05, 0.05],  # bracket 2, validation 4: {0.1, 0.05}: needs the best -> pruned at 4
        [0.30, 0.99, 0.99, 0.99],  # bracket 0, rung 1: 5 values, needs the top 5 // 2 = 2 (>= 0.55): pruned at 1
    ])
    assert got == [("COMPLETE", None, 0.70), ("PRUNED", 1, pytest.approx(0.40)), ("PRUNED", 2, pytest.approx(0.50)),
                   ("COMPLETE", None, 0.80), ("COMPLETE", None, 0.10), ("PRUNED", 4, pytest.approx(0.05)),
                   ("PRUNED", 1, pytest.approx(0.30))]


def test_the_callback_stops_a_real_run_and_metrics_json_says_pruned(tmp_path, data_dir, one_thread):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = pruner_spec("median", {"n_startup_trials": 1})
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", pruner=make_pruner(spec))
    study.set_user_attr(PRUNER_ATTR, spec)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    reference = study.ask(dist)  # a finished trial no R@1 can reach: any first validation is below its median
    for step in (1, 2, 3):
        reference.report(1.01, step)
    study.tell(reference, 1.01)
    trial = study.ask(dist)
    cfg = compose_train([*TINY_DATA, "trainer.accelerator=cpu", "trainer.max_epochs=3", "data.batches_per_epoch=2",
                         "trainer.check_val_every_n_epoch=1", "evaluate_before_training=false", "logger=none",
                         "trainer.enable_progress_bar=false", f"optuna.storage='{storage}'", "optuna.study_name=s",
                         f"optuna.trial={trial.number}"], tmp_path, data_dir)
    from ddtas_lightning.runtime.training import train

    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["pruned"]["at_validation"] == 1
    assert metrics["global_steps"] == 2  # stopped after the first epoch's validation (of 3 epochs: 6 steps)
    assert "test" not in metrics and metrics["compute"]["fit_cpu_s"] > 0
    stored = optuna.load_study(study_name="s", storage=storage).trials[trial.number]
    assert stored.user_attrs[PRUNED_ATTR] == 1 and list(stored.intermediate_values) == [1]
    assert stored.intermediate_values[1] == pytest.approx(metrics["val"]["val/R@1"])


def test_the_sigterm_hint_of_a_study_trial_is_the_sweep_command(tmp_path, capsys, data_dir):
    """A trial's single-run resume command would run outside the study: the hint is the sweep's -m command."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ddtas_lightning.runtime.signals import SIGTERMException, exit_for_signal
    from tests.conftest import CONF_DIR

    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(
        {"hydra": {"overrides": {"task": ["hparams_search=threshold_tpe", "seed=1"]}}}))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hparams_search=threshold_tpe", "seed=1", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}"])
    HydraConfig.instance().set_config(cfg)
    try:
        exc = SIGTERMException()
        exc.stop_signal, exc.global_step = signal.SIGTERM, 7
        assert exit_for_signal(exc, tmp_path / "3", ["seed=1", "loss.threshold=0.5"]) == 143
    finally:
        HydraConfig.instance().cfg = None
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: stopped by SIGTERM at step 7; this run is a trial of an Optuna study")
    assert (f"re-run the same -m command with the same sweep dir: python -m ddtas_lightning.train -m "
            f"hparams_search=threshold_tpe seed=1 hydra.sweep.dir={tmp_path} (the study continues") in line
    assert "ckpt_path=last" not in line


# ---- task B: a tiny grid + successive-halving sweep through the CLI, then compare ---------------------------
@pytest.mark.slow  # 3 tiny trials through the CLI: ~40 s on 2 cores
def test_a_grid_sha_sweep_end_to_end_and_compare(tmp_path, capsys):
    from ddtas_lightning.compare import main as compare_main
    from tests.test_sweep import SMALL

    sweep = tmp_path / "sha"
    small = [o for o in SMALL if not o.startswith("trainer.max_epochs")]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", "-m", "hparams_search=threshold_grid_sha",
         f"paths.data_dir={tmp_path}/data", *small, "trainer.max_epochs=3", "trainer.val_check_interval=1.0",
         "loss.threshold=choice(0.1,0.5,0.9)", "hydra.sweeper.n_trials=3",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((sweep / "optuna.json").read_text())
    assert study["sampler"] == "Grid" and study["pruner"]["kind"] == "successive_halving"
    assert sorted(t["params"]["loss.threshold"] for t in study["trials"]) == [0.1, 0.5, 0.9]
    for t in study["trials"]:
        metrics = json.loads((sweep / str(t["number"]) / "metrics.json").read_text())
        assert t["state"] in ("COMPLETE", "PRUNED") and metrics["compute"]["fit_cpu_s"] > 0
        steps = sorted(int(s) for s in t["intermediate"])
        if t["state"] == "PRUNED":
            assert metrics["status"] == "pruned" and "test" not in metrics
            assert steps[-1] == metrics["pruned"]["at_validation"] < 3
        else:
            assert metrics["status"] == "trained" and "test" in metrics and steps == [1, 2, 3]
    pruned = sum(t["state"] == "PRUNED" for t in study["trials"])
    assert compare_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    label = "Grid + pruning" if pruned else "Grid"
    assert f"{label} sha (seed 0): 3 trials" + (f" ({pruned} pruned)" if pruned else "") in out
