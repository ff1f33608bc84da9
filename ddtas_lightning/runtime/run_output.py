"""What a run shows on its console: the composed config once, as a tree (also saved), and progress that
suits where the output goes (a bar on a terminal, one line every N steps in a log file or SLURM)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
# Printed first, in this order; the other top-level keys follow.
TREE_ORDER = ("tags", "dataset", "transform", "backbone", "loss", "miner", "threshold_policy", "optimizer",
              "scheduler", "data", "trainer", "callbacks", "logger")


def config_tree(cfg: DictConfig) -> str:
    """The composed config as YAML, one block per group (groups in :data:`TREE_ORDER`), interpolations
    resolved where they can be (``${hydra:...}`` outside a Hydra app stays as written)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only a Hydra app resolves
        plain = OmegaConf.to_container(cfg, resolve=False)
    keys = [k for k in TREE_ORDER if k in plain] + [k for k in plain if k not in TREE_ORDER and k != "hydra"]
    blocks = [OmegaConf.to_yaml({key: plain[key]}).rstrip() for key in keys]
    return "\n".join(blocks) + "\n"


def show_config(cfg: DictConfig, output_dir: Path, enabled: bool | None = None) -> Path:
    """Print :func:`config_tree` (unless ``print_config: false``) and save it as ``config_tree.yaml``
    in the run dir (Hydra's ``.hydra/config.yaml`` keeps the unresolved one)."""
    text = config_tree(cfg)
    path = Path(output_dir) / "config_tree.yaml"
    path.write_text(text)
    if (cfg.get("print_config", True) if enabled is None else enabled) and _is_rank_zero():
        print("== config ==\n" + text, flush=True)
    return path


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"


class LineProgress(pl.Callback):
    """One log line every ``every_n_steps`` optimiser steps (and at each epoch end): epoch, step,
    loss, steps/s. Used instead of the progress bar when stdout is not a terminal."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self._t0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def _line(self, trainer, what: str) -> None:
        if not trainer.is_global_zero:
            return
        rate = (trainer.global_step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        loss_s = f" loss {float(loss):.4f}" if loss is not None else ""
        print(f"[{what}] epoch {trainer.current_epoch} step {trainer.global_step}{loss_s} ({rate:.2f} steps/s)",
              flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._line(trainer, "train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._line(trainer, "epoch end")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            vals = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/R@1", "val/MAP@R")}
            if vals:
                print("[val] " + "  ".join(f"{k} {100 * v:.2f}" for k, v in vals.items()), flush=True)


def progress_options(trainer_cfg: DictConfig, callbacks: list, stream=None) -> dict:
    """Trainer keyword overrides: with a progress bar asked for and ``stream`` (stdout) not a terminal,
    the bar is switched off and a :class:`LineProgress` appended to ``callbacks`` (in place)."""
    stream = sys.stdout if stream is None else stream
    wants_bar = trainer_cfg.get("enable_progress_bar", True)
    if not wants_bar or getattr(stream, "isatty", lambda: False)():
        return {}
    callbacks.append(LineProgress(50))
    return {"enable_progress_bar": False}
