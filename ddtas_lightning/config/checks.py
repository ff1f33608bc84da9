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

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

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
    check_run_mode(cfg)  # hparams_search=... without -m
    check_run_values(cfg)  # NaN/inf anywhere, seed, recall_ks, trainer.max_epochs, dataset.image_size
    check_booleans(cfg)  # evaluate_before_training=no, metrics.nmi=off, ...
    check_known_keys(cfg)  # +data.batchsize=8, +optimizer.lrr=0.1
    check_ignored_combinations(cfg)  # data.val_folds with data.selection=test
    check_cpu_precision(cfg)  # trainer.precision=16-true on a CPU
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


# ---- issue 21: values read loosely, ignored combinations, misspelt added keys, CPU precision, RUN mode ----
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Groups whose values belong to a third-party class with its own non-boolean spellings (ModelCheckpoint's
# save_last="link", WandbLogger's log_model="all"): their booleans are that class's to check.
_BOOL_SCAN_SKIP = ("hydra", "local", "callbacks", "logger")
# A boolean key that also takes these values (Lightning's own meanings).
BOOL_ALSO: dict[str, Callable[[Any], bool]] = {
    "trainer.deterministic": lambda v: v == "warn",
    "trainer.fast_dev_run": lambda v: isinstance(v, int),
    "data.pin_memory": lambda v: v == "auto",
}


@functools.lru_cache(maxsize=4)
def boolean_keys(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Every dotted key that some config file under ``conf_dir`` sets to true or false and none sets to
    anything else but null (``# @package _global_`` files at the root, the others under their group's
    path): the keys the code reads as booleans. Derived from the files, so a new boolean option is
    checked without being listed here."""
    bools: set[str] = set()
    other: set[str] = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node.keys():
            if key == "defaults" or str(key).startswith("_"):
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, name)
                continue
            if isinstance(child, ListConfig):
                continue
            value = child._value()
            if isinstance(value, bool):
                bools.add(name)
            elif value is not None and not (isinstance(value, str) and value.startswith("${")):
                other.add(name)

    for path in sorted(Path(conf_dir).rglob("*.yaml")):
        parts = path.relative_to(conf_dir).parts
        if parts[0] in _BOOL_SCAN_SKIP:
            continue
        try:
            text = path.read_text()
            node = OmegaConf.load(path)
        except Exception:  # a malformed file is Hydra's to report
            continue
        if isinstance(node, DictConfig):
            glob = len(parts) == 1 or "@package _global_" in text
            walk(node, "" if glob else ".".join(parts[:-1]))
    return frozenset(k for k in bools - other if not k.startswith("hydra."))


def check_booleans(cfg: DictConfig, keys: Collection[str] | None = None) -> None:
    """Booleans must be booleans: ``evaluate_before_training=no`` is the string 'no', which Python reads as
    true, and ``metrics.nmi=off`` computes NMI. One ConfigError naming the key and 'true/false'."""
    for key in sorted(boolean_keys() if keys is None else keys):
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is None or isinstance(value, bool) or BOOL_ALSO.get(key, lambda v: False)(value):
            continue
        hint = (f" ({value!r} is a string, and any non-empty string reads as true)" if isinstance(value, str)
                else "")
        raise ConfigError(f"{key} must be true or false, got {value!r}{hint}")


def check_ignored_combinations(cfg: DictConfig) -> None:
    """Settings another setting makes ineffective: an error instead of a run that silently ignores them."""
    data = cfg.get("data") or {}
    if data.get("selection") == "test" and data.get("val_folds") is not None:
        raise ConfigError(f"data.val_folds={data.val_folds} is ignored with data.selection=test (validation on the "
                          "test split, the papers' protocol: no validation classes are held out); drop "
                          "data.val_folds, or keep it with data.selection=val")
    if data.get("val_folds") is None and data.get("val_fold") not in (None, 0):
        raise ConfigError(f"data.val_fold={data.val_fold} is ignored without data.val_folds (folds of the train "
                          "classes); set data.val_folds=k (e.g. data.val_folds=4), or drop data.val_fold")


# Keys of a node that the code removes before passing the rest as keyword arguments.
_OWN_KEYS = {"optimizer": {"loss_lr"}, "data": set()}
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Config nodes passed to a class as keyword arguments: ``_target_`` nodes that ``instantiate`` builds, and
# ``data`` (DMLDataModule's keyword arguments). An unknown key there is a TypeError traceback otherwise.
KWARGS_NODES = ("data", "optimizer", "scheduler", "loss", "miner", "threshold_policy", "dataset.source",
                "transform", "trainer")


def _parameters(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts (None: it takes ``**kwargs``, or cannot be inspected)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


def check_known_keys(cfg: DictConfig) -> None:
    """A misspelt added key (``+data.batchsize=8``, ``+optimizer.lrr=0.1``) under a node passed on as keyword
    arguments: one ConfigError naming the key, the closest known key and the known keys, instead of a
    TypeError traceback from the constructor."""
    from ddtas_lightning.data.datamodule import DMLDataModule

    for name in KWARGS_NODES:
        node = OmegaConf.select(cfg, name, default=None, throw_on_resolution_failure=False)
        if not isinstance(node, DictConfig):
            continue
        if name == "data":
            target, what = DMLDataModule, "DMLDataModule"
            known = _parameters(DMLDataModule)
            known = None if known is None else known - {"self", "source", "transform", "seed", "with_meta_batch"}
        else:
            target_name = node.get("_target_")
            if not isinstance(target_name, str):
                continue
            try:
                target = hydra.utils.get_object(target_name)
            except Exception:  # an unknown _target_ is instantiate's to report
                continue
            what, known = target_name, _parameters(target)
            known = None if known is None else known - {"self", "params", "optimizer"}
        if known is None:
            continue
        allowed = known | _HYDRA_KEYS | _OWN_KEYS.get(name, set())
        for key in node.keys():
            if key in allowed:
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(
                f"{name}.{key} is not an option of {what}"
                + (f"; did you mean {name}.{close[0]}?" if close else ";")
                + f" its options: {', '.join(sorted(known))}")


# trainer.precision values that run in float16 on a CPU: the embeddings come out NaN.
CPU_BAD_PRECISIONS = frozenset({"16-true", "16", "half"})
CPU_PRECISIONS = ("32-true", "64-true", "bf16-mixed")


def check_cpu_precision(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer") or {}
    accelerator, precision = trainer.get("accelerator"), trainer.get("precision")
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if on_cpu and precision is not None and str(precision) in CPU_BAD_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} on the CPU (trainer.accelerator={accelerator}): float16 "
                          "weights on a CPU give NaN embeddings; on a CPU use one of "
                          f"{', '.join(CPU_PRECISIONS)} (default 32-true), or run on a GPU")


def check_run_mode(cfg: DictConfig) -> None:
    """A sweeper-only recipe (``hparams_search=...``, ``hydra/sweeper=tpe``) composed without ``-m``: Hydra
    ignores the sweeper in RUN mode and makes one plain run with the recipe's defaults, exit 0, no
    search. Refused, naming ``-m``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:  # not under a Hydra app (tests call train() directly)
        return
    target = str(OmegaConf.select(hc, "sweeper._target_", default="") or "")
    if hc.mode != RunMode.RUN or not target.endswith("TPESweeper"):
        return
    choice = OmegaConf.select(hc, "runtime.choices.hparams_search", default=None)
    what = f"hparams_search={choice}" if choice else "hydra/sweeper=tpe"
    raise ConfigError(f"{what} is a sweep (an Optuna study of hydra.sweeper.n_trials runs), but this is a single "
                      f"run: add -m (python -m ddtas_lightning.train -m {what} ...); without -m Hydra ignores the "
                      "sweeper and would make one plain run with the recipe's defaults")
