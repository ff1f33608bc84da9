"""Is a checkpoint loadable into the module this config builds? One clear error before training if not.

Lightning restores ``ckpt_path`` with a strict ``load_state_dict`` deep inside ``trainer.fit``, after the
untrained evaluation, and a checkpoint written under another config (another ``backbone.dim`` or
backbone, ``threshold_policy=meta`` vs ``static``, ...) then fails with a ``RuntimeError`` listing every
key, in a 40-line traceback. :func:`check_checkpoint_compat` compares the checkpoint's ``state_dict``
(names and shapes, the two things a strict load checks; buffers a submodule declares in
``variable_shape_state`` change shape as they fill and are only checked by name) with the module's before anything runs, and
raises one :class:`~ddtas_lightning.config.validation.ConfigError` naming ``ckpt_path``, the first few
mismatches, the config groups they belong to and, when the checkpoint's run dir still holds Hydra's
``.hydra/config.yaml``, the config values that differ.

When the model fits, the config is compared too: every checkpoint carries the composed config of the
run that wrote it (``ddtas_config``, saved by :class:`ddtas_lightning.runtime.run_dir.ConfigInCheckpoint`), and
:func:`check_resume_config` refuses a resume whose config differs in any key outside
:data:`RESUME_MAY_CHANGE` (where it writes and logs, how long it trains, the hardware, the loader
processes): ``ckpt_path=last optimizer=sgd`` gets the same "written under another config" error instead
of ``KeyError: 'momentum'`` from the optimiser state. Through the CLI the same check runs in a Hydra
callback before Hydra rewrites ``.hydra/config.yaml`` (:mod:`ddtas_lightning.runtime.run_dir`).

Apart from that, only the ``state_dict`` is checked: other checkpoint entries (optimizer, loops, RNG and sampler state)
are Lightning's and the callbacks' business. The file is opened with ``weights_only=True`` and
``mmap=True`` (:mod:`ddtas_lightning.runtime.safe_load`), so tensors are not read into memory; a
checkpoint whose entries need a full unpickler (any Python object besides tensors and plain values) is
refused with one error before anything runs: unpickling it could run code (``docs/security.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.runtime.safe_load import load_torch_file

log = logging.getLogger(__name__)

# First component of a DMLModule state_dict key -> the config group that builds that submodule.
PREFIX_GROUPS = {"model": "backbone", "policy": "threshold_policy", "loss_fn": "loss", "miner": "miner"}
SHOW = 5  # mismatches listed per kind


# The run's composed config (unresolved, as Hydra's .hydra/config.yaml) is saved in every checkpoint
# under this key (ConfigInCheckpoint), so a resume is judged against the config that wrote the weights.
CONFIG_KEY = "ddtas_config"
# Keys that may differ between the run that wrote a checkpoint and the run resuming from it: where
# things are written and logged, how long to train, the hardware, the loader processes, evaluation
# extras. Everything else must be equal (a resume continues the same optimisation).
RESUME_MAY_CHANGE = (
    "ckpt_path", "paths", "logger", "callbacks", "task_name", "evaluate_before_training", "test_after_training",
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.devices", "trainer.num_nodes",
    "trainer.accelerator", "trainer.strategy", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "trainer.plugins", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
    "data.eval_batch_size", "metrics.knn_backend",
    # listed in conf/trainer/default.yaml (so plain overrides work), and not part of the optimisation
    "trainer.min_epochs", "trainer.min_steps", "trainer.limit_val_batches", "trainer.limit_test_batches",
    "trainer.val_check_interval", "trainer.profiler", "trainer.detect_anomaly", "trainer.enable_model_summary",
    "trainer.benchmark",
)


def load_state_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the checkpoint's ``state_dict``. Raises ConfigError for an unreadable file, one
    that needs a full unpickler, or one without a ``state_dict``."""
    ckpt = _load(path)
    state = ckpt.get("state_dict")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_saved_config(path: str | Path) -> dict | None:
    """The config saved inside the checkpoint (:data:`CONFIG_KEY`); ``None`` for a checkpoint written
    before configs were saved."""
    saved = _load(path).get(CONFIG_KEY)
    return saved if isinstance(saved, dict) else None


CKPT_EXPECTED = "a .ckpt file written by this framework (e.g. <run dir>/checkpoints/last.ckpt)"


def _load(path: str | Path) -> dict:
    """The checkpoint, weights only and memory-mapped (:func:`~ddtas_lightning.runtime.safe_load.load_torch_file`):
    a file that asks for any other Python object is refused here, before the untrained evaluation, instead
    of failing inside ``trainer.fit`` (or, with an older torch, running it)."""
    ckpt = load_torch_file(path, what="ckpt_path", noun="checkpoint", expected=CKPT_EXPECTED, mmap=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(
            f"ckpt_path: {path} is not a Lightning checkpoint (no 'state_dict' entry); ckpt_path resumes a "
            "run of this framework. To start from backbone weights use backbone.checkpoint_path instead"
        )
    return ckpt


def state_mismatches(ckpt: dict[str, tuple[int, ...]], module: nn.Module) -> dict[str, list[str]]:
    """What a strict ``load_state_dict`` would reject: ``missing`` (in the module, not the checkpoint),
    ``unexpected`` (the reverse) and ``shape`` (``"key: (a, b) in the checkpoint, (c, d) here"``)."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    variable = variable_shape_keys(module)
    return {
        "missing": sorted(own.keys() - ckpt.keys()),
        "unexpected": sorted(ckpt.keys() - own.keys()),
        "shape": [f"{k}: {ckpt[k]} in the checkpoint, {own[k]} here"
                  for k in sorted(own.keys() & ckpt.keys()) if own[k] != ckpt[k] and k not in variable],
    }


def variable_shape_keys(module: nn.Module) -> set[str]:
    """state_dict keys whose shape changes during training (a submodule lists such buffers in a
    ``variable_shape_state`` attribute and resizes them when loading, e.g. a cross-batch memory)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, sub in module.named_modules()
            for name in getattr(sub, "variable_shape_state", ())}


def groups_of(keys: list[str]) -> list[str]:
    """Config groups owning the given state_dict keys (in PREFIX_GROUPS order)."""
    prefixes = {k.split(".", 1)[0] for k in keys}
    return [g for p, g in PREFIX_GROUPS.items() if p in prefixes]


def saved_config_diff(path: Path, cfg: DictConfig | None, groups: list[str]) -> list[str]:
    """``"<key>: <old> in the checkpoint's run, <new> here"`` for the leaves of ``groups`` (and each
    group's ``_target_``, i.e. the option chosen) that differ from the config saved by Hydra next to
    the checkpoint's run (``<run>/.hydra/config.yaml`` for ``<run>/checkpoints/x.ckpt``)."""
    saved = _saved_config(path) if cfg is not None else None
    if saved is None:
        return []
    diffs = []
    for group in groups:
        old = _leaves(OmegaConf.to_container(saved[group], resolve=False) if group in saved else {}, group)
        new = _leaves(OmegaConf.to_container(cfg[group], resolve=False) if group in cfg else {}, group)
        for key in sorted(old.keys() | new.keys()):
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                diffs.append(f"{key}: {old.get(key, '<unset>')} in the checkpoint's run, "
                             f"{new.get(key, '<unset>')} here")
    return diffs


def _saved_config(path: Path) -> DictConfig | None:
    """The config of the run that wrote ``path``: the one saved inside it, else Hydra's
    ``<run>/.hydra/config.yaml`` next to ``<run>/checkpoints/`` (checkpoints of older versions)."""
    inside = load_saved_config(path)
    if inside is not None:
        return OmegaConf.create(inside)
    saved_file = path.parent.parent / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        return None
    try:
        return OmegaConf.load(saved_file)
    except Exception:  # a hand-edited or foreign file: the key comparison alone still stands
        return None


def resume_config_diff(path: str | Path, cfg: DictConfig) -> list[str]:
    """``"<key>: <old> in the checkpoint's run, <new> here"`` for every config leaf outside
    :data:`RESUME_MAY_CHANGE` that both configs have and that differs from the config saved inside the
    checkpoint (nothing to compare for a checkpoint without one)."""
    saved = load_saved_config(path)
    if saved is None:
        return []
    old = _leaves(saved, "")
    new = _leaves(OmegaConf.to_container(cfg, resolve=False), "")
    # Keys on one side only are a version's new or retired options (a changed group option shows in
    # its _target_); values the two configs share must agree.
    keys = [k for k in sorted(old.keys() & new.keys()) if not _may_change(k)]
    return [f"{k}: {old[k]} in the checkpoint's run, {new[k]} here" for k in keys if old[k] != new[k]]


def _may_change(key: str) -> bool:
    return key == "hydra" or key.startswith("hydra.") or any(
        key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def check_resume_config(path: str | Path, cfg: DictConfig) -> None:
    """Raise one ConfigError when the config differs from the one saved inside the checkpoint in a key
    a resume may not change (the optimiser, the loss, the data, the seed, ...)."""
    diffs = resume_config_diff(path, cfg)
    if diffs:
        more = f" (and {len(diffs) - SHOW} more)" if len(diffs) > SHOW else ""
        raise ConfigError(
            f"ckpt_path: checkpoint {path} was written under another config: config values that differ: "
            f"{'; '.join(diffs[:SHOW])}{more}. Resume with the config of the run that wrote it (a resume may "
            "change only where it writes, how long it trains, the hardware and the loader processes), or "
            "start a new run without ckpt_path"
        )


def check_checkpoint_compat(path: str | Path, module: nn.Module, cfg: DictConfig | None = None) -> None:
    """Raise one ConfigError naming ``ckpt_path`` when the checkpoint's state_dict does not fit ``module``
    (the module built from ``cfg``), or ``cfg`` differs from the config saved in the checkpoint where a
    resume may not change it; a no-op when it fits."""
    path = Path(path)
    shapes = load_state_shapes(path)
    bad = state_mismatches(shapes, module)
    if not any(bad.values()):
        if cfg is not None:
            check_resume_config(path, cfg)
        return
    parts = []
    for kind, label in (("shape", "shape mismatches"), ("missing", "missing from the checkpoint"),
                        ("unexpected", "in the checkpoint but not in this model")):
        items = bad[kind]
        if items:
            more = f" (and {len(items) - SHOW} more)" if len(items) > SHOW else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:SHOW])}{more}")
    keys = bad["missing"] + bad["unexpected"] + [s.split(":", 1)[0] for s in bad["shape"]]
    groups = groups_of(keys)
    diffs = saved_config_diff(path, cfg, groups)
    where = (" from config group(s) " + ", ".join(groups)) if groups else ""
    hint = ("; config values that differ: " + "; ".join(diffs[:SHOW])) if diffs else ""
    raise ConfigError(
        f"ckpt_path: checkpoint {path} was written under another config: its state_dict does not match "
        f"the model built now{where} ({'; '.join(parts)}){hint}. Resume with the config of the run that "
        "wrote it, or start a new run without ckpt_path"
    )


def _leaves(node, prefix: str) -> dict[str, str]:
    if isinstance(node, dict) and node:
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: repr(node) if isinstance(node, str) else str(node)}
