"""What ``train()`` does between ``trainer.fit`` and the test, so every run ends the same way:

* :func:`validate_at_end`: a run whose last training step was not validated (``trainer.max_steps`` mid-epoch,
  a resume to a later ``max_epochs``, ``check_val_every_n_epoch`` past the last epoch, ``debug=profiler``)
  validates once more, and every monitoring ``ModelCheckpoint`` considers that validation like one inside
  ``fit`` (saves a best checkpoint when it is the best so far). Without it such a run had no best checkpoint,
  reported ``best val R@1 nan`` and tested its last weights without saying so;
* :func:`tested_weights`: which weights the final test used (the best checkpoint, its validation R@1 and
  step; or the last weights, and why), for ``metrics.json`` and the summary;
* :func:`final_thresholds`: the threshold the run ended with (a learned lambda's final value, a learned
  margin), not only the configured start (``loss_threshold``);
* :func:`remove_last_checkpoint`: ``callbacks.keep_last=false`` deletes ``last.ckpt`` after a run that
  finished (it exists to resume an unfinished run, or to train a finished one longer).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from ddtas_lightning.runtime.run_record import ValidationHistory

log = logging.getLogger(__name__)

NO_VALIDATION = "last (no validation)"


def last_validated_step(trainer: pl.Trainer) -> int | None:
    """The global step of the run's latest validation (restored from a checkpoint on resume), or None."""
    history = next((c for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
    if history is None or not history.history:
        return None
    return int(history.history[-1]["step"])


def validate_at_end(trainer: pl.Trainer, module: pl.LightningModule, datamodule) -> bool:
    """Validate the final weights unless the last training step already was (see the module docstring);
    returns whether it validated. Not for ``fast_dev_run`` (it validates one batch and saves nothing), a
    run without validation (``limit_val_batches=0``) or one that trained no step. Every rank calls it."""
    step = int(trainer.global_step)
    if step == 0 or trainer.fast_dev_run or not trainer.enable_validation:
        return False
    if last_validated_step(trainer) == step:
        return False
    log.info("validating the final weights (step %d): the last training step was not validated", step)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    # What a monitoring ModelCheckpoint does after a validation inside fit (its hooks skip outside fit).
    # last.ckpt is not written again: it keeps the state right after the last step (random state included),
    # so a resume continues exactly like an uninterrupted run; the resumed run's best is chosen among the
    # validations that checkpoint knows and its own (not this one).
    for callback in trainer.callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.monitor is None or callback.save_top_k == 0:
            continue
        candidates = callback._monitor_candidates(trainer)
        # after fit, current_epoch counts the finished epochs: the last step belongs to the one before
        candidates["epoch"] = torch.tensor(max(int(trainer.current_epoch) - 1, 0))
        callback._save_topk_checkpoint(trainer, candidates)
    return True


def tested_weights(best_path: str, best_score: float | None, val_at_best: dict, output_dir: Path | None = None
                   ) -> dict:
    """``metrics.json``'s ``tested_weights``: ``{"which": "best checkpoint", "checkpoint", "val/R@1", "step"}``
    (the checkpoint relative to the run dir, like ``checkpoints/epoch000-step000020-valR@1_0.1667.ckpt``;
    ``best_checkpoint`` keeps the absolute path) or ``{"which": "last (no validation)", "checkpoint": None, ...}``."""
    if best_path:
        score = best_score if best_score is not None else val_at_best.get("val/R@1")
        path = Path(best_path)
        if output_dir is not None and path.is_relative_to(Path(output_dir)):
            path = path.relative_to(Path(output_dir))
        return {"which": "best checkpoint", "checkpoint": str(path),
                "val/R@1": None if score is None else float(score), "step": val_at_best.get("step")}
    return {"which": NO_VALIDATION, "checkpoint": None, "val/R@1": None, "step": None}


def _number(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        value = value.detach().float().mean()
    value = float(value)
    return None if math.isnan(value) else value


def final_thresholds(module: pl.LightningModule, trainer: pl.Trainer) -> dict:
    """``final_lambda`` (the policy's lambda now, or the loss's own threshold when the policy sets none; the
    mean when lambda has several components), ``final_lambda_detail`` (its components: ``pos``/``neg``, the
    per-anchor lambdas' mean/min/max of the last meta step, per head), and ``final_margin`` for a learned
    miner margin. Read before any later validation replaces the step metrics."""
    out: dict = {}
    policy = getattr(module, "policy", None)
    lam = policy.current_threshold() if policy is not None and hasattr(policy, "current_threshold") else None
    if lam is None:
        lam = getattr(getattr(module, "loss_fn", None), "threshold", None)
    if isinstance(lam, torch.Tensor):
        values = [float(v) for v in lam.detach().float().reshape(-1)]
        out["final_lambda"] = _number(lam)
        if len(values) == 2:
            out["final_lambda_detail"] = {"pos": values[0], "neg": values[1]}
        elif len(values) > 2:
            out["final_lambda_detail"] = {"values": values}
    else:
        out["final_lambda"] = _number(lam)
    metrics = trainer.callback_metrics
    anchors = {k.rsplit("_", 1)[-1]: _number(metrics[k]) for k in
               ("train/lambda_anchor_mean", "train/lambda_anchor_min", "train/lambda_anchor_max") if k in metrics}
    if anchors:  # per-anchor lambdas: the run's lambda is their mean
        out["final_lambda_detail"] = {**out.get("final_lambda_detail", {}),
                                      **{f"anchor_{k}": v for k, v in anchors.items()}}
        if anchors.get("mean") is not None:
            out["final_lambda"] = anchors["mean"]
    if policy is not None and getattr(policy, "learn_margin", False) and hasattr(policy, "margin"):
        out["final_margin"] = _number(policy.margin)
    return out


def remove_last_checkpoint(cfg: DictConfig, output_dir: Path) -> Path | None:
    """``callbacks.keep_last=false``: delete ``<run dir>/checkpoints/last.ckpt`` of a finished run; returns it."""
    callbacks = cfg.get("callbacks") or {}
    if callbacks.get("keep_last", True) is not False:
        return None
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        last.unlink()
        return last
    return None
