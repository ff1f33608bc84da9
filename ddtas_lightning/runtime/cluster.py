"""DDP inside a sweep job: Lightning's cluster environment for processes that submitit started.

A sweep whose every job is a multi-process DDP run (``hydra/launcher=submitit_local`` or ``slurm`` with
``hydra.launcher.tasks_per_node = trainer.devices``) starts each rank itself: submitit runs the Hydra
job once per task. Lightning must then *not* launch ranks of its own (its subprocess launcher would
re-run ``sys.argv``, which inside a submitit job is submitit's entry point: the failure
lightning-hydra-template users report), but join the ranks that exist. Under SLURM, Lightning's own
``SLURMEnvironment`` reads srun's variables; for the local executor this environment reads submitit's
(``SUBMITIT_LOCAL_*``: tasks, global and local rank, job id) and derives the rendezvous port from the
job id, so every task of one job agrees on it and two jobs running at once do not collide.
"""

from __future__ import annotations

import os
import zlib

from lightning.fabric.plugins.environments import ClusterEnvironment


class SubmititLocalEnvironment(ClusterEnvironment):
    """The ranks of a submitit local job with ``tasks_per_node > 1`` (one node, 127.0.0.1)."""

    PORT_RANGE = (20000, 40000)

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        low, high = self.PORT_RANGE
        return low + zlib.crc32(os.environ["SUBMITIT_LOCAL_JOB_ID"].encode()) % (high - low)

    @staticmethod
    def detect() -> bool:
        return "SUBMITIT_LOCAL_JOB_ID" in os.environ and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1

    def world_size(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_NTASKS"])

    def set_world_size(self, size: int) -> None:
        pass  # given by submitit

    def global_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_GLOBALID"])

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_LOCALID"])

    def node_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NODEID", "0"))


def cluster_plugins() -> list[ClusterEnvironment]:
    """The environment to add to the trainer's plugins in a multi-task submitit local job, else none."""
    return [SubmititLocalEnvironment()] if SubmititLocalEnvironment.detect() else []
