"""What a config that came with a file may build: the allow-list of ``_target_`` and resolvers.

``evaluate ckpt_path=X`` rebuilds the model from the config stored in the checkpoint
(``ddtas_config``) or from an explicit ``run_config=<file>``, through ``hydra.utils.instantiate``. That
config is data from whoever wrote the file: ``_target_: pathlib.Path.write_text`` (or ``os.system``)
with a few arguments would run as soon as it is instantiated, and ``${oc.env:AWS_SECRET_ACCESS_KEY}``
would copy an environment variable into the outputs. :func:`check_trusted_config` walks such a config
before anything is built and raises one :class:`ConfigError` naming the refused ``_target_`` (or
resolver), its key path and the file, unless every node passes:

- ``_target_``: one of :data:`TRUSTED_TARGETS` (the ``_target_`` names of the shipped ``conf/``: functions,
  the trainer, callbacks, loggers; ``tests/test_security.py`` checks that every ``_target_`` in ``conf/``
  passes), or a class defined in one of :data:`TRUSTED_CLASS_PACKAGES` (the project's datasets,
  transforms, models, losses, miners and policies; torch optimisers and schedulers; the
  pytorch-metric-learning parts ``loss=pml`` / ``miner=pml`` nest in their ``kwargs``). A prefix alone is
  never enough: Hydra's ``_locate`` walks attributes, so ``torch.optim.os.system`` starts with
  ``torch.optim.`` and is ``os.system``; the path before the name must be a module of the package and the
  object a class defined in the package (no function, no imported name). Lists (``_args_``, callbacks) are
  walked too; ``_partial_``, ``_recursive_`` and ``_convert_`` only change how an allowed target is
  called and are left alone.
- interpolations: plain references (``${backbone.dim}``) and the resolvers :data:`TRUSTED_RESOLVERS`
  (``oc.select``: another key of the same config; ``now``: the time). ``oc.env``, ``oc.decode``,
  ``oc.create``, ``hydra:`` and any registered custom resolver are refused, except under ``paths.``,
  which ``evaluate`` replaces with this machine's paths before anything is resolved.

The project's own configs (composed by ``train`` from ``conf/``) are the user's own code and are not
checked here; what is checked is a config read from a checkpoint or a file next to one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ddtas_lightning.config.validation import ConfigError

# The _target_ names of conf/ that are not classes of TRUSTED_CLASS_PACKAGES: functions, the trainer, its
# callbacks and loggers (stored with the config; evaluate builds its own trainer), Hydra's own nodes.
# tests/test_security.py checks that every _target_ of conf/ passes.
TRUSTED_TARGETS = frozenset({
    "ddtas_lightning.models.pretrained.embedder",
    "lightning.pytorch.Trainer", "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.EarlyStopping", "ddtas_lightning.runtime.checkpointing.PeriodicCheckpoint",
    "ddtas_lightning.runtime.slurm.slurm_environment", "ddtas_lightning.report.csv_logger.ContinuingCSVLogger",
    "ddtas_lightning.report.wandb_logger.wandb_logger",
    "ddtas_lightning.runtime.run_dir.RunDirGuard", "hydra_plugins.ddtas_tpe_sweeper.tpe_sweeper.TPESweeper",
})
# Packages whose classes a config may build: ``<package>[.<module>...].<Name>`` where the dotted path before
# <Name> is an importable module inside the package and <Name> a class defined inside the package (not
# something it imports: ``torch.optim.os`` is a module, not a class of torch.optim).
TRUSTED_CLASS_PACKAGES = (
    "ddtas_lightning.data", "ddtas_lightning.models", "ddtas_lightning.losses", "ddtas_lightning.miners",
    "ddtas_lightning.policies", "torch.optim",
    "pytorch_metric_learning.losses", "pytorch_metric_learning.miners", "pytorch_metric_learning.distances",
    "pytorch_metric_learning.reducers", "pytorch_metric_learning.regularizers",
)
TRUSTED_RESOLVERS = ("oc.select", "now")
# Subtrees whose interpolations are never resolved from the file (evaluate puts this machine's paths there).
REPLACED_KEYS = ("paths",)
_RESOLVER = re.compile(r"(?<!\\)\$\{\s*([^${}:\s]+)\s*:")


def is_trusted_target(target: Any) -> bool:
    """Whether ``_target_`` names something a config from a file may build (see the module doc)."""
    if not isinstance(target, str):
        return False
    if target in TRUSTED_TARGETS:
        return True
    module, _, name = target.rpartition(".")
    package = next((p for p in TRUSTED_CLASS_PACKAGES if module == p or module.startswith(p + ".")), None)
    if package is None or not name.isidentifier() or name.startswith("_"):
        return False
    import importlib
    import inspect

    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # Hydra would fail on it anyway; refusing says which key
    defined_in = getattr(obj, "__module__", None) or ""
    return inspect.isclass(obj) and (defined_in == package or defined_in.startswith(package + "."))


def untrusted_nodes(node: Any, path: str = "") -> list[tuple[str, str]]:
    """``(key path, what is refused)`` for every untrusted ``_target_`` or resolver in ``node`` (a plain
    container: ``OmegaConf.to_container(cfg, resolve=False)``)."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        if "_target_" in node and not is_trusted_target(node["_target_"]):
            found.append((f"{path}._target_" if path else "_target_", f"_target_ {node['_target_']!r}"))
        for key, value in node.items():
            if key == "_target_":
                continue
            found += untrusted_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, Sequence) and not isinstance(node, str | bytes):
        for i, value in enumerate(node):
            found += untrusted_nodes(value, f"{path}[{i}]")
    elif isinstance(node, str) and path.split(".", 1)[0] not in REPLACED_KEYS:
        for resolver in _RESOLVER.findall(node):
            if resolver not in TRUSTED_RESOLVERS:
                found.append((path, f"interpolation {node!r} (resolver {resolver!r})"))
    return found


def check_trusted_config(config: Any, source: str) -> None:
    """Raise one ConfigError naming the first untrusted ``_target_`` / resolver of ``config`` (a dict or
    DictConfig), its key path and ``source`` (the file it came from); a no-op when everything passes."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config
    bad = untrusted_nodes(plain)
    if bad:
        key, what = bad[0]
        more = f" (and {len(bad) - 1} more: {', '.join(k for k, _ in bad[1:4])})" if len(bad) > 1 else ""
        raise ConfigError(
            f"{key}: {what} in the config of {source} is not on the allow-list of what a config from a file may "
            f"build{more}; refused before anything was built (ddtas_lightning.config.trusted_targets: the "
            "targets conf/ uses, classes of the project's data / models / losses / miners / policies, torch "
            "optimisers and schedulers, pytorch-metric-learning parts, and the resolvers "
            f"{', '.join(TRUSTED_RESOLVERS)}). A checkpoint is data: evaluate only files whose config you have "
            "checked, or pass run_config=<a config you trust>"
        )


__all__ = ["TRUSTED_CLASS_PACKAGES", "TRUSTED_RESOLVERS", "TRUSTED_TARGETS", "check_trusted_config",
           "is_trusted_target", "untrusted_nodes"]
