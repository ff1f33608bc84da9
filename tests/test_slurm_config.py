"""hydra/launcher=slurm and trainer=slurm agree on the requeue signal: the sbatch script submitit would
submit asks SLURM for SIGUSR2 before the time limit (and allows requeueing), submitit handles SIGUSR2, and
Lightning's SLURMEnvironment listens for the same signal. Config level: no cluster needed (a stub `srun`
on PATH satisfies submitit's check)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from ddtas_lightning.runtime.slurm import requeue_signal
from tests.conftest import CONF_DIR


@pytest.fixture
def slurm_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=["experiment=threshold_grid", "hydra/launcher=slurm", "trainer=slurm"],
                       return_hydra_config=True)


def sbatch_script(launcher: dict, folder: Path, monkeypatch) -> str:
    """The sbatch file hydra-submitit-launcher's SlurmLauncher.launch() would submit (its parameter
    mapping: executor-specific keys get the ``slurm_`` prefix, max_num_timeout goes to the executor)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    stub = folder / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}:{__import__('os').environ['PATH']}")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    params["name"] = "train"  # ${hydra.job.name}
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=launcher["max_num_timeout"])
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    assert executor._executor.max_num_timeout == launcher["max_num_timeout"]
    return executor._executor._make_submission_file_text("python -m ddtas_lightning.train", "uid")


def test_launcher_and_trainer_requeue_on_the_same_signal(slurm_cfg, tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmJobEnvironment

    plugins = instantiate(slurm_cfg.trainer.plugins)  # before the srun stub is on PATH (Lightning warns)
    envs = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert len(envs) == 1 and envs[0].auto_requeue
    launcher = OmegaConf.to_container(slurm_cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["max_num_timeout"] >= 1 and launcher["signal_delay_s"] >= 60
    script = sbatch_script(launcher, tmp_path, monkeypatch)
    sent = re.search(r"^#SBATCH --signal=(\w+)@(\d+)$", script, re.M)
    assert sent and int(sent.group(2)) == launcher["signal_delay_s"], script
    assert re.search(r"^#SBATCH --requeue$", script, re.M), script

    # one signal: the one SLURM is asked to send, the one submitit handles, the one Lightning listens for
    assert envs[0].requeue_signal == getattr(signal, f"SIG{sent.group(1)}") == SlurmJobEnvironment._usr_sig()
    assert envs[0].requeue_signal == signal.SIGUSR2


def test_the_requeued_run_resumes_from_last_checkpoint(slurm_cfg):
    assert slurm_cfg.ckpt_path == "last"  # train.py: <run dir>/checkpoints/last.ckpt when it exists
    assert slurm_cfg.trainer.accelerator == "auto"  # the node's GPU when it has one


def test_requeue_signal_follows_submitit_environment_variable(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert requeue_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert requeue_signal() == signal.SIGUSR1
    assert requeue_signal("SIGTERM") == signal.SIGTERM
    with pytest.raises(ValueError, match="unknown signal 'NOPE'"):
        requeue_signal("nope")
