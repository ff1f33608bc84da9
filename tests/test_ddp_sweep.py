"""Sweeps whose every job is a multi-process DDP run (the case lightning-hydra-template users report
broken): on SLURM (`hydra/launcher=slurm trainer=slurm_ddp trainer.devices=W`) the sbatch script asks
for W tasks and W GPUs per node and every rank joins through Lightning's SLURMEnvironment, checked at
config level; on this machine the same shape runs for real: `hydra/launcher=submitit_local
hydra.launcher.tasks_per_node=2 trainer=ddp` starts 2 gloo processes per job, which join through
ddtas_lightning.runtime.cluster.SubmititLocalEnvironment instead of Lightning re-launching sys.argv."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from ddtas_lightning.runtime.cluster import SubmititLocalEnvironment, cluster_plugins
from tests.conftest import CONF_DIR, TINY_DATA
from tests.test_slurm_config import sbatch_script

REPO = Path(__file__).resolve().parents[1]


def test_slurm_sweep_of_ddp_jobs_asks_one_task_and_gpu_per_device(tmp_path, monkeypatch):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=threshold_grid", "hydra/launcher=slurm", "trainer=slurm_ddp",
                                          "trainer.devices=4"], return_hydra_config=True)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4
    plugins = instantiate(cfg.trainer.plugins)
    assert any(isinstance(p, SLURMEnvironment) and p.auto_requeue for p in plugins)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    script = sbatch_script(launcher, tmp_path, monkeypatch)
    assert re.search(r"^#SBATCH --ntasks-per-node=4$", script, re.M), script
    assert re.search(r"^#SBATCH --gpus-per-node=4$", script, re.M), script


def test_submitit_local_environment_reads_submitits_variables(monkeypatch):
    for key in ("SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert cluster_plugins() == []
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1234")
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    assert cluster_plugins() == []  # one task: Lightning's own single-process path
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "1")
    (env,) = cluster_plugins()
    assert isinstance(env, SubmititLocalEnvironment) and env.creates_processes_externally
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (2, 1, 1, 0)
    port = env.main_port
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1235")
    assert 20000 <= port < 40000 and env.main_port != port  # another job, another rendezvous port


@pytest.mark.slow
def test_sweep_of_two_ddp_jobs_with_two_gloo_processes_each(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", "-m", "experiment=threshold_grid", "arm=lambda_0.3,meta",
         "seed=0", *TINY_DATA, "data.meta_batch_size=4", "data.batches_per_epoch=null", "trainer.max_epochs=1", "trainer=ddp", "trainer.devices=2",
         "trainer.accelerator=cpu", "backbone.freeze_bn=true", "hydra/launcher=submitit_local",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", f"paths.data_dir={tmp_path}/data",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job, policy in ((0, "StaticThreshold"), (1, "MetaThreshold")):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["choices"]["threshold_policy"] == policy
        assert metrics["compute"]["world_size"] == 2  # both ranks trained the job (CPU seconds summed)
        assert metrics["global_steps"] == 3
    logs = "\n".join(p.read_text(errors="replace") for p in sweep.glob(".submitit/*/*_log.*"))
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs, logs[-3000:]
