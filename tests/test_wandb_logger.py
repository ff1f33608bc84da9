"""logger=wandb: offline unless an API key is configured, runs grouped by sweep and tagged static/dynamic,
the resolved config passed in, per-step threshold curves in the offline run files; each job of a
basic-launcher sweep gets its own W&B run. No network: offline or disabled mode only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

from ddtas_lightning.report.wandb_logger import resolve_mode, run_tags
from ddtas_lightning.runtime.training import train
from tests.conftest import TINY_DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))


def test_mode_is_offline_without_an_api_key(no_wandb_env, monkeypatch, tmp_path):
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert resolve_mode(None) == "online"
    with pytest.raises(ValueError, match="must be one of online, offline, disabled"):
        resolve_mode("sometimes")


def test_tags_say_static_or_dynamic():
    static = {"threshold_policy": {"_target_": "ddtas_lightning.policies.StaticThreshold"},
              "miner": {"_target_": "ddtas_lightning.miners.asms.ASMS"}}
    adaptive = {**static, "miner": {"_target_": "ddtas_lightning.miners.at_asms.AdaptiveToleranceASMS"}}
    assert run_tags(static, {"threshold_policy": "static", "miner": "asms", "arm": "lambda_0.3"}) == [
        "static", "policy:static", "miner:asms", "arm:lambda_0.3"]
    assert run_tags(adaptive, {}, ["mine"]) == [
        "dynamic", "policy:StaticThreshold", "miner:AdaptiveToleranceASMS", "mine"]


def test_logger_config_groups_tags_and_logs_the_resolved_config(tiny_cfg, no_wandb_env):
    cfg = tiny_cfg("logger=wandb", "threshold_policy=meta", "logger.wandb.tags=[mine]")
    assert set(cfg.logger) == {"csv", "wandb"}  # the CSV log stays (compare reads its per-step curves)
    logger = instantiate(cfg.logger.wandb)  # no W&B run is started until the logger is used
    init = logger._wandb_init
    assert init["mode"] == "offline" and init["group"] == "train" and init["dir"] == cfg.paths.output_dir
    assert init["tags"][0] == "dynamic" and "mine" in init["tags"]
    assert init["config"]["threshold_policy"]["_target_"] == "ddtas_lightning.policies.MetaThreshold"
    assert init["config"]["loss"]["threshold"] == cfg.loss.threshold and init["config"]["seed"] == 0


def test_offline_run_files_are_written_under_the_run_dir(tiny_cfg, monkeypatch, no_wandb_env):
    import wandb

    cfg = tiny_cfg("logger=wandb", "miner=at_asms", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                   "trainer.enable_progress_bar=false")
    train(cfg)
    wandb.finish()
    (run_dir,) = Path(cfg.paths.output_dir, "wandb").glob("offline-run-*")
    data = wandb_bytes(run_dir, b"mining/tolerance")
    for needle in (b"train/lambda", b"mining/ratio", b"mining/tolerance", b"dynamic", b"AdaptiveToleranceASMS"):
        assert needle in data, needle
    assert Path(cfg.paths.output_dir, "csv", "metrics.csv").is_file()


def wandb_bytes(run_dir: Path, needle: bytes, timeout_s: float = 60.0) -> bytes:
    """The run's transaction log once it holds ``needle``: W&B's service process writes it out
    asynchronously, possibly after the training process has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = b"".join(p.read_bytes() for p in run_dir.glob("run-*.wandb"))
        if needle in data or time.monotonic() > deadline:
            return data
        time.sleep(0.5)


def test_each_job_of_a_sweep_gets_its_own_offline_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(WANDB_MODE="offline", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", "-m", "logger=wandb", f"paths.data_dir={tmp_path}/data",
         *TINY_DATA, "trainer.max_epochs=1", "trainer.accelerator=cpu", "loss.threshold=0.4,0.6",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = set()
    for job in ("0", "1"):
        (run_dir,) = (tmp_path / "sweep" / job / "wandb").glob("offline-run-*")
        ids.add(run_dir.name.rsplit("-", 1)[1])
        data = wandb_bytes(run_dir, b"train/lambda")
        assert b"train-sweep" in data  # group: <task_name>-<sweep dir name>
        assert f"loss.threshold={0.4 if job == '0' else 0.6}".encode() in data  # name: the job's overrides
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["global_steps"] == 3
    assert len(ids) == 2
