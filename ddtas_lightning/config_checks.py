"""Checks over the whole composed config, run first by ``train.validate_config``.

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

from omegaconf import DictConfig, ListConfig, OmegaConf

from ddtas_lightning.data.sampler import SMALL_CLASSES
from ddtas_lightning.validation import ConfigError, as_int, check_choice

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
