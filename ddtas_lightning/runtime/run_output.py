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
    """Save :func:`config_tree` as ``config_tree.yaml`` in the run dir (Hydra's ``.hydra/config.yaml`` keeps
    the unresolved one) and print it with ``print_config: true``; otherwise print :func:`config_summary`."""
    text = config_tree(cfg)
    path = Path(output_dir) / "config_tree.yaml"
    path.write_text(text)
    if not _is_rank_zero():
        return path
    if cfg.get("print_config", False) if enabled is None else enabled:
        print("== config ==\n" + text, flush=True)
    else:
        print(f"== config (the whole tree: {path}; print_config=true prints it) ==\n" + config_summary(cfg),
              flush=True)
    return path


def _choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except (ImportError, ValueError):  # not under a Hydra app (tests call train() directly)
        return {}


def _cls(node) -> str:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return str(target).rsplit(".", 1)[-1] if target else "-"


def _sel(cfg: DictConfig, key: str, default="-"):
    try:
        value = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)
    except Exception:  # an interpolation only a Hydra app resolves
        return default
    return default if value is None else value


def config_summary(cfg: DictConfig) -> str:
    """A few lines: the chosen option of every config group, then the values that define the run."""
    choices = {k: v for k, v in _choices().items()
               if not k.startswith("hydra") and k not in ("paths", "local") and v is not None}
    order = [*TREE_ORDER, "experiment", "debug", "hparams_search"]
    ordered = sorted(choices, key=lambda k: order.index(k) if k in order else len(order))
    groups = " ".join(f"{k}={choices[k]}" for k in ordered) or " ".join(
        f"{g}={_cls(cfg.get(g))}" for g in ("dataset", "backbone", "loss", "miner", "threshold_policy", "optimizer"))
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}
    bs, k = _sel(cfg, "data.batch_size"), _sel(cfg, "data.K")
    per = f"{bs // k} classes x {k}" if isinstance(bs, int) and isinstance(k, int) and k else "?"
    lines = [
        f"groups   {groups}",
        f"data     {_sel(cfg, 'dataset.name')}, {_sel(cfg, 'dataset.image_size')} px, batch {bs} = {per}, "
        f"selection={data.get('selection', '-')}, workers {data.get('num_workers', '-')}",
        f"model    {_sel(cfg, 'backbone.model_name')}, {_sel(cfg, 'backbone.dim')}-d, "
        f"pretrained={_sel(cfg, 'backbone.pretrained')}",
        f"loss     {_cls(cfg.get('loss'))} (λ {_sel(cfg, 'loss.threshold')}), miner {_cls(cfg.get('miner'))}, "
        f"policy {_cls(cfg.get('threshold_policy'))}",
        f"optim    {_cls(cfg.get('optimizer'))} lr {_sel(cfg, 'optimizer.lr')}, scheduler {_cls(cfg.get('scheduler'))}",
        f"trainer  max_epochs {trainer.get('max_epochs', '-')}, max_steps {trainer.get('max_steps', '-')}, "
        f"validate every {trainer.get('check_val_every_n_epoch', '-')} epoch(s), "
        f"accelerator {trainer.get('accelerator', '-')}, precision {trainer.get('precision', '-')}",
        f"run      seed {cfg.get('seed', '-')}, tags {list(cfg.get('tags') or [])}, "
        f"output {_sel(cfg, 'paths.output_dir')}",
    ]
    return "\n".join(lines) + "\n"


# ---- third-party noise, each silenced at the narrowest point that reaches it ------------------------------
class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


_QUIET = _DropMessages("litlogger", "litmodels")


def quiet_third_party() -> None:
    """Silence three messages every run printed that say nothing about it (idempotent):

    * Lightning's "Tip: ... try installing litlogger" / "litmodels" (advertisements, logged at INFO by its
      rank-zero logger when a Trainer is built): a filter on the loggers that emit them, for those texts only;
    * torch's FutureWarning "``isinstance(treespec, LeafSpec)`` is deprecated", raised inside Lightning's
      ``utilities/_pytree.py`` (not our code; Lightning has to change it): ignored for that message only;
    * torch's FutureWarning "``torch.jit.script`` is deprecated", raised when torch registers its own
      forward-mode AD decompositions with ``torch.jit.script`` at the first dual tensor (the meta, MMSI and
      hypergrad policies' jvp): the decompositions are loaded here, once, with that one warning ignored.
    """
    import warnings

    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        try:
            from torch.autograd import forward_ad

            load = getattr(forward_ad, "_maybe_load_decompositions", None)
            if load is not None:
                load()
        except Exception:  # a torch without it: the warning (if any) is torch's to give
            pass


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
