"""Training entry point: ``python -m ddtas_lightning.train [overrides]``.

Composes conf/train.yaml and runs :func:`ddtas_lightning.runtime.training.train` (build, untrained test,
fit, test of the selected checkpoint, ``metrics.json``); maps its failures to exit codes
(:mod:`ddtas_lightning.runtime.errors`) and SIGTERM/SIGINT to a saved ``last.ckpt`` and exit 143/130.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ddtas_lightning.runtime.errors import (
    exit_code_for,
    in_multirun,
    root_cause,
    task_overrides,
    to_log_files,
)

# Lightning, timm, faiss, wandb are imported when a run starts (in main), not at import time: `--help`
# and Hydra's own errors (an unknown option, a bad override) print at once (benchmarks/bench_startup.py; tests/test_package_layout.py checks it).


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from ddtas_lightning.runtime.signals import SIGTERMException, exit_for_signal
    from ddtas_lightning.runtime.training import train

    try:
        return train(cfg)
    except SIGTERMException as exc:  # SIGTERM/SIGINT: last.ckpt saved at the signal, exit 143/130
        sys.exit(exit_for_signal(exc, cfg.paths.output_dir, task_overrides()))
    except Exception as exc:  # one clear line for bad input instead of a deep traceback
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"error: {root_cause(exc)}", file=sys.stderr)
        to_log_files(f"error: {root_cause(exc)}")  # the job's log file, where compare finds it
        if in_multirun():
            raise  # Hydra records the job as failed and the sweep goes on (compare reports it)
        sys.exit(code)


if __name__ == "__main__":
    main()
