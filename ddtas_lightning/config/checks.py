"""Every check of a composed training config, in one place: :func:`validate_config` runs first in a training run.

:func:`reject_non_finite` is the one mechanism for NaN / infinite numbers: it walks every leaf of
every group (lists included) and rejects a NaN or an infinity with the ``must be a number`` message
the typed checks give (``miner.epsilon=nan``, ``threshold_policy.lr=nan``, ``loss.threshold=inf``
...), unless the key is one of :data:`INF_ALLOWED` (none today). No component needs to remember it.

:func:`check_run_values` covers values that otherwise fail with a traceback (``seed=-1``,
``trainer.max_epochs=1.5``, ``metrics.recall_ks=5``) or only at test time (``dataset.image_size=0``),
and ``data.small_classes`` (checked here, before the sampler is built at the start of training).
"""

from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ddtas_lightning.config.validation import ConfigError, as_float, as_int, check_choice
from ddtas_lightning.data.datamodule import SELECTIONS, check_batch_shape
from ddtas_lightning.data.image_dataset import BAD_IMAGE_MODES
from ddtas_lightning.data.sampler import SMALL_CLASSES

# Keys where +-inf means something (e.g. "no bound"); NaN is never allowed.
INF_ALLOWED: frozenset[str] = frozenset()
SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range


def non_finite_leaves(node, prefix: str = "") -> list[tuple[str, float]]:
    """``(key, value)`` of every float leaf of ``node`` that is NaN or infinite (keys in dotted form,
    list items as ``key[i]``). Interpolations that cannot be resolved here are skipped."""
    out: list[tuple[str, float]] = []
    if isinstance(node, DictConfig):
        items = [(f"{prefix}.{k}" if prefix else str(k), k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(f"{prefix}[{i}]", i) for i in range(len(node))]
    else:
        return out
    for name, key in items:
        try:
            value = node[key]
        except Exception:  # ${hydra:...} outside Hydra, a missing value (checked elsewhere), ...
            continue
        if isinstance(value, DictConfig | ListConfig):
            out += non_finite_leaves(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            out.append((name, value))
    return out


def reject_non_finite(cfg: DictConfig) -> None:
    """One ConfigError for the first NaN (anywhere) or infinity (outside :data:`INF_ALLOWED`)."""
    for key, value in non_finite_leaves(cfg):
        if math.isinf(value) and key in INF_ALLOWED:
            continue
        raise ConfigError(f"{key} must be a number, got {value!r} (NaN and infinity are not allowed)")


def check_run_values(cfg: DictConfig) -> None:
    """Top-level values checked before anything is built (see the module docstring)."""
    reject_non_finite(cfg)
    seed = as_int("seed", cfg.seed, 0)
    if seed > SEED_MAX:
        raise ConfigError(f"seed must be an integer in [0, {SEED_MAX}], got {seed}")
    ks = OmegaConf.select(cfg, "metrics.recall_ks")
    if not isinstance(ks, ListConfig | list | tuple):
        raise ConfigError(f"metrics.recall_ks must be a non-empty list of integers >= 1, got {ks!r} "
                          f"(e.g. metrics.recall_ks=[{ks}] for one K)")
    trainer = cfg.get("trainer") or {}
    for key, minimum in (("max_epochs", -1), ("max_steps", -1), ("check_val_every_n_epoch", 1)):
        if trainer.get(key) is not None:
            as_int(f"trainer.{key}", trainer.get(key), minimum)
    data = cfg.get("data") or {}
    check_choice("data.small_classes", data.get("small_classes", "replace"), SMALL_CLASSES)
    dataset = cfg.get("dataset") or {}
    if dataset.get("image_size") is not None:
        as_int("dataset.image_size", dataset.get("image_size"), 1)


def validate_config(cfg: DictConfig) -> None:
    """Checks that would otherwise fail late (after minutes of evaluation), with a deep traceback, or
    silently, deep inside training. Each names the key and what is allowed (see docs/bad_inputs.md);
    values the components check themselves (loss, miner, policy, backbone options) are checked there."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} has no value ('???'); set it on the command line, e.g. "
                          f"{missing[0]}=<value>" + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else ""))
    check_run_values(cfg)  # NaN/inf anywhere, seed, recall_ks, trainer.max_epochs, dataset.image_size
    data = cfg.data
    batch_size, k = as_int("data.batch_size", data.batch_size, 1), as_int("data.K", data.K)
    try:
        check_batch_shape(batch_size, k)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    as_float("data.val_fraction", data.val_fraction, 0.0, 1.0, high_open=True)
    check_choice("data.selection", data.selection, SELECTIONS)
    if data.val_folds is not None:
        as_int("data.val_folds", data.val_folds, 2)
    as_int("data.val_fold", data.val_fold, 0)
    check_choice("data.on_bad_image", data.on_bad_image, BAD_IMAGE_MODES)
    if data.batches_per_epoch is not None:
        as_int("data.batches_per_epoch (null: one pass over the train images)", data.batches_per_epoch, 1)
    as_int("data.eval_batch_size", data.eval_batch_size, 1)
    as_int("data.num_workers", data.num_workers, 0)
    _validate_meta_batch(cfg)
    as_int("backbone.dim", cfg.backbone.dim, 1)
    ks = list(cfg.metrics.recall_ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"metrics.recall_ks must be a non-empty list of integers >= 1, got {ks}")
    check_choice("metrics.knn_backend", cfg.metrics.knn_backend, ("torch", "faiss"))
    as_float("optimizer.lr", cfg.optimizer.lr, 0.0)
    if cfg.optimizer.get("weight_decay") is not None:
        as_float("optimizer.weight_decay", cfg.optimizer.weight_decay, 0.0)
    as_int("module.max_nonfinite_steps", cfg.module.max_nonfinite_steps, 1)
    # Lightning reports this as a MisconfigurationException with a traceback; it is the common case of
    # trainer=gpu (or a GPU recipe) started on a machine without CUDA.
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is available; "
                          "use trainer=cpu or trainer.accelerator=auto")


def _validate_meta_batch(cfg: DictConfig) -> None:
    """The meta batch (P_m x K_m) of a policy that needs one, and a learned lambda's start inside its
    bounds when it starts at ``loss.threshold`` (otherwise only found at the first training step)."""
    policy_cls = hydra.utils.get_class(cfg.threshold_policy._target_)
    if getattr(policy_cls, "needs_meta_batch", False):
        size = as_int("data.meta_batch_size", cfg.data.meta_batch_size, 1)
        k = getattr(policy_cls, "meta_K", None) or as_int("data.meta_K", cfg.data.meta_K, 1)
        if size % k != 0 or size < 2 * k:
            raise ConfigError(f"data.meta_batch_size={size} must be a multiple of data.meta_K={k} with at "
                              f"least 2 classes (e.g. {max(2, size // k) * k})")
    policy = cfg.threshold_policy
    if {"init", "min", "max"} <= set(policy) and policy.init is None and cfg.loss.get("threshold") is not None:
        lam = as_float("loss.threshold", cfg.loss.threshold)
        low = as_float("threshold_policy.min", policy.min)
        high = as_float("threshold_policy.max", policy.max)
        if low <= high and not low <= lam <= high:  # min > max: the policy's own message
            raise ConfigError(
                f"loss.threshold={lam} is the initial lambda (threshold_policy.init=null) but lies outside "
                f"[threshold_policy.min, threshold_policy.max] = [{low}, {high}]; set threshold_policy.init "
                "or the bounds"
            )
