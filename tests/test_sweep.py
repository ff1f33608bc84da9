"""experiment=threshold_grid: every arm composes into the configuration (and static/dynamic kind) it names,
the sweep runs every arm with the same seeds; two-point sweeps through the basic launcher and through
submitit_local (whose pickled job, as a requeue would re-run it, lands in the same run dir and resumes);
a sweep over an unknown key or arm is one clear message."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddtas_lightning.compare import main as compare_main
from ddtas_lightning.report.kinds import class_name, run_kind
from tests.conftest import CONF_DIR, TINY_DATA

REPO = Path(__file__).resolve().parents[1]
ARMS = sorted(p.stem for p in Path(CONF_DIR, "arm").glob("*.yaml"))
HAS_MMSI = Path(CONF_DIR, "threshold_policy", "mmsi.yaml").is_file()
# arm -> (kind, lambda, miner margin, policy class, miner class)
EXPECTED = {
    **{f"lambda_{lam}": ("static", lam, 0.1, "StaticThreshold", "ASMS") for lam in (0.1, 0.3, 0.5, 0.7, 0.9)},
    "margin_0.05": ("static", 0.7, 0.05, "StaticThreshold", "ASMS"),
    "margin_0.2": ("static", 0.7, 0.2, "StaticThreshold", "ASMS"),
    "at_asms": ("dynamic", 0.7, 0.1, "StaticThreshold", "AdaptiveToleranceASMS"),
    "meta": ("dynamic", 0.7, 0.1, "MetaThreshold", "ASMS"),
    "ddtas": ("dynamic", 0.7, 0.1, "MetaThreshold", "AdaptiveToleranceASMS"),
    "mmsi": ("dynamic", 0.7, 0.1, "MMSI", "ASMS"),
    "hypergrad": ("dynamic", 0.7, 0.1, "HypergradThreshold", "ASMS"),
}
# Tiny runs: 4 train classes (3 steps an epoch), meta batch 2 classes x 2.
SMALL = [*TINY_DATA, "data.meta_batch_size=4", "data.batches_per_epoch=null", "trainer.max_epochs=1",
         "trainer.accelerator=cpu"]


def test_every_arm_has_expectations_and_is_swept():
    assert set(ARMS) == set(EXPECTED)
    params = OmegaConf.load(Path(CONF_DIR, "experiment", "threshold_grid.yaml")).hydra.sweeper.params
    assert sorted(params.arm.split(",")) == ARMS
    assert len(str(params.seed).split(",")) >= 2  # mean and spread over seeds


@pytest.mark.parametrize("arm", ARMS)
def test_arm_composes_into_its_configuration(arm, tiny_cfg):
    if arm == "mmsi" and not HAS_MMSI:
        pytest.skip("threshold_policy=mmsi not available")
    cfg = tiny_cfg("experiment=threshold_grid", f"arm={arm}")
    kind, lam, margin, policy, miner = EXPECTED[arm]
    assert (cfg.loss.threshold, cfg.miner.margin) == (lam, margin)
    assert (class_name(cfg.threshold_policy._target_), class_name(cfg.miner._target_)) == (policy, miner)
    assert run_kind(cfg.threshold_policy._target_, cfg.miner._target_) == kind
    assert class_name(cfg.loss._target_) == "SoftContrastiveLoss" and cfg.task_name == "threshold_grid"
    for group in ("loss", "miner", "threshold_policy"):
        instantiate(cfg[group])


def multirun_cli(head: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", "-m", head, f"paths.data_dir={cwd}/data", *SMALL, *overrides],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=900,
    )


def sweep_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return multirun_cli("experiment=threshold_grid", *overrides, cwd=cwd)


def tpe_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return multirun_cli("hparams_search=threshold_tpe", *overrides, cwd=cwd)


def test_two_point_sweep_and_a_tpe_study_then_compare(tmp_path, capsys):
    proc = sweep_cli("arm=lambda_0.3,meta", "seed=0", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert [r["choices"]["threshold_policy"] for r in runs] == ["StaticThreshold", "MetaThreshold"]
    assert [r["loss_threshold"] for r in runs] == [0.3, 0.7]
    assert all(r["selection"] == "val" and r["compute"]["fit_cpu_s"] > 0 for r in runs)

    # Optuna TPE over (lambda, m), objective = validation R@1: 2 trials, then the same command with the
    # same sweep dir continues the persistent study to 3 (one more trial, not three).
    tpe = tmp_path / "tpe"
    for n in (2, 3):
        proc = tpe_cli(f"hydra.sweep.dir={tpe}", f"hydra.sweeper.n_trials={n}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((tpe / "optuna.json").read_text())
    assert [t["number"] for t in study["trials"]] == [0, 1, 2] and study["sampler"] == "TPE"
    # the resumed study drew a new point (a restarted sampler repeated trial 0's: tests/test_optuna_sweeper.py)
    assert len({tuple(sorted(t["params"].items())) for t in study["trials"]}) == 3
    assert all(t["state"] == "COMPLETE" for t in study["trials"])
    for t in study["trials"]:  # the trial's objective is its run's best validation R@1; its params its config
        metrics = json.loads((tpe / str(t["number"]) / "metrics.json").read_text())
        assert t["value"] == pytest.approx(metrics["best_val_R@1"])
        assert metrics["loss_threshold"] == pytest.approx(t["params"]["loss.threshold"])
        assert 0.1 <= t["params"]["loss.threshold"] <= 0.95 and 0.02 <= t["params"]["miner.margin"] <= 0.3

    assert compare_main([str(tmp_path / "sweep"), str(tpe)]) == 0
    out = capsys.readouterr().out
    assert "grid search, chosen on validation per seed (headline): lambda_0.3" in out
    assert "dynamic meta: ΔR@1" in out and "0 failed" in out
    assert "TPE tpe (seed 0): 3 trials" in out and "at the compute of one meta run" in out
    report = tmp_path / "sweep" / "report"
    assert (report / "report.md").is_file()
    for name in ("r1_vs_threshold.png", "lambda_curves.png", "quality_vs_compute.png", "tpe_best_so_far.png",
                 "val_vs_test.png"):
        assert (report / name).is_file(), name


def test_a_failed_job_is_reported_with_its_error_line(tmp_path, capsys):
    proc = sweep_cli("arm=lambda_0.3", "seed=0", "data.K=2,1", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode != 0  # Hydra reports the failed job after the sweep
    assert compare_main([str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "1 failed" in out and "error: data.K (images per class in a batch) must be >= 2, got 1" in out


def test_two_point_sweep_submitit_local_and_a_requeued_job_resumes_in_its_run_dir(tmp_path):
    # The default sweep dir, multirun/threshold_grid/${now:...}, relative to where the sweep starts.
    proc = sweep_cli("arm=lambda_0.3", "seed=0,1", "hydra/launcher=submitit_local", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "threshold_grid").iterdir()
    assert [json.loads((sweep / str(i) / "metrics.json").read_text())["seed"] for i in range(2)] == [0, 1]

    # A requeue re-runs the pickled submission (submitit.core._submit). A second later ${now:...} would
    # name another sweep dir, unless the launcher's config carries the resolved one: it must, so the
    # requeued job finds its run dir and resumes from last.ckpt (ckpt_path=last) instead of restarting.
    time.sleep(1.1)
    (pkl,) = [p for p in sweep.glob(".submitit/*/*_submitted.pkl")
              if pickle.loads(p.read_bytes()).args[2] == 1]  # job number 1
    script = (
        "import pickle, sys\n"
        "sub = pickle.load(open(sys.argv[1], 'rb'))\n"
        "sub.function(*sub.args)\n"
    )
    before = json.loads((sweep / "1" / "metrics.json").read_text())
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               _TEST_CLUSTER_="debug", SUBMITIT_DEBUG_JOB_ID="requeued")  # submitit's job environment for tests
    proc = subprocess.run([sys.executable, "-c", script, str(pkl)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "multirun" / "threshold_grid").iterdir()) == [sweep.name]
    after = json.loads((sweep / "1" / "metrics.json").read_text())
    assert after["seed"] == 1 and after["global_steps"] == before["global_steps"]  # resumed at the end
    assert "Restoring states from the checkpoint path at" in proc.stdout + proc.stderr + (
        sweep / "1" / "train.log").read_text()


def test_sweep_over_an_unknown_key_is_one_clear_message(tmp_path):
    proc = sweep_cli("nope=1,2", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not override 'nope'" in proc.stderr


def test_sweep_over_an_unknown_arm_lists_the_arms(tmp_path):
    proc = sweep_cli("arm=nope", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'arm/nope'" in proc.stderr and "lambda_0.3" in proc.stderr
