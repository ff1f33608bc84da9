"""SLURM requeue on preemption and timeout: the signal submitit and Lightning must agree on.

``hydra/launcher=slurm`` (hydra-submitit-launcher) submits every sweep job with ``sbatch
--signal=USR2@<signal_delay_s>``: SLURM sends SIGUSR2 that long before the time limit (and at preemption
where the cluster sets ``PreemptParameters=send_user_signal``). submitit's handler in the job then
pickles the launcher call again (same overrides, same job number, same sweep dir, hence the same run
dir), requeues the job and exits; the requeued job resumes from ``<run dir>/checkpoints/last.ckpt``
(``ckpt_path=last``). Timeouts are requeued up to ``max_num_timeout`` times, preemptions always.

``trainer=slurm`` adds Lightning's ``SLURMEnvironment(auto_requeue=True)`` with the *same* signal
(:func:`requeue_signal`). Under submitit, Lightning sees submitit's handler already installed and leaves
it alone (its SignalConnector never replaces an existing handler); for a job started by your own sbatch
script with ``--signal=USR2@...``, Lightning's handler saves ``hpc_ckpt_<n>.ckpt`` in the run dir and
requeues. Lightning's default signal (SIGUSR1) would never be sent by either.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.plugins.environments import SLURMEnvironment

# submitit's rule (submitit.core.job_environment.JobEnvironment.USR_SIG): USR2 unless overridden.
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def requeue_signal(name: str | None = None) -> signal.Signals:
    """``SIG<name>``; by default the signal submitit sends and handles (``$SUBMITIT_PREEMPT_SIGNAL`` or USR2)."""
    name = (name or os.environ.get(PREEMPT_SIGNAL_ENV) or "USR2").upper().removeprefix("SIG")
    sig = getattr(signal, f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"requeue signal: unknown signal {name!r} (e.g. USR2)")
    return sig


def slurm_environment(auto_requeue: bool = True, requeue_signal_name: str | None = None) -> SLURMEnvironment:
    """Lightning's SLURM cluster environment requeueing on submitit's signal (``trainer=slurm``)."""
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=requeue_signal(requeue_signal_name))
