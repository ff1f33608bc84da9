"""The one way this project opens a file a user may have been given: tensors and plain values only.

A ``.ckpt`` / ``.pth`` is a pickle. Unpickling runs whatever the file names (``__reduce__``: "call
``os.system`` with these arguments"), so a checkpoint downloaded from a colleague, a model zoo or a
shared cluster directory is code unless it is opened with ``torch.load(..., weights_only=True)``, whose
unpickler builds tensors, numbers, strings, lists, tuples and dicts only and refuses every other global
*before* calling it. Every torch file this project reads goes through :func:`load_torch_file`: the
checkpoint of ``evaluate`` (``ckpt_path``), a resumed training run's ``ckpt_path`` (checked before
anything runs, :mod:`ddtas_lightning.runtime.checkpoint_compat`), ``backbone.checkpoint_path``
(:func:`check_weights_file`, before timm opens it, also weights-only) and the NSPA report's held-out
evaluation. NumPy files go through :func:`load_npz` (``allow_pickle=False``: object arrays are pickles
too). A file that needs anything else is refused with one :class:`~ddtas_lightning.config.validation.ConfigError`
naming the key, the file and the Python object it asked for; nothing in it is run.

Checkpoints written by this project hold only such values (``DMLModule.on_save_checkpoint``), so
nothing is lost. See ``docs/security.md``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from ddtas_lightning.config.validation import ConfigError


class UnsafeFileError(ConfigError):
    """A file that could only be loaded by running what it names (a pickled Python object): refused."""


PLAIN = "tensors, numbers, strings, lists and dicts (torch.load(..., weights_only=True))"
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_REASON = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    match = _REASON.search(text)  # torch's long weights-only message: its one informative line
    if match:
        return match.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _exists(path: Path, what: str, noun: str, expected: str) -> None:
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "does not exist"
        tail = f" (expected {expected})" if expected else ""
        raise ConfigError(f"{what}: {noun} {path} {state}{tail}")


def load_torch_file(path: str | Path, *, what: str, noun: str = "file", expected: str = "",
                    mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one ConfigError per way it fails.

    what: the config key or option the file came from (``ckpt_path``, ``backbone.checkpoint_path``);
    noun: what the file is (``checkpoint``); expected: what a good file is, for the message; mmap: map
    the tensors instead of reading them (zip-format files, every ``torch.save`` since torch 1.6).
    """
    import pickle

    import torch

    path = Path(path)
    hint = f"; expected {expected}" if expected else ""
    _exists(path, what, noun, expected)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": said below if it matters
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:  # mmap needs the zip format
                if not mmap or "zip" not in str(e).lower():
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found:
            raise UnsafeFileError(
                f"{what}: {noun} {path} asks to construct the Python object {found.group(1)} when loaded, and "
                "unpickling it could run any code: refused (a file from elsewhere is data, not code). Only "
                f"files of {PLAIN} are loaded{hint}; re-save the weights as a state dict "
                "(torch.save(model.state_dict(), path)) or .safetensors"
            ) from None
        raise ConfigError(f"{what}: cannot read {noun} {path}: UnpicklingError: {_first_line(e)}{hint}") from None
    except Exception as e:  # truncated zip, not a torch file, unreadable
        raise ConfigError(f"{what}: cannot read {noun} {path}: {type(e).__name__}: {_first_line(e)}{hint}") from None


def check_weights_file(path: str | Path, *, what: str, expected: str = "") -> None:
    """Refuse a weights file that is not plain data before a library opens it: ``.safetensors`` are data
    by construction (their header is parsed), anything else must load with :func:`load_torch_file`
    (memory-mapped: the tensors are not read)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _exists(path, what, "weights file", expected)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:
            hint = f"; expected {expected}" if expected else ""
            raise ConfigError(f"{what}: cannot read weights file {path}: {type(e).__name__}: "
                              f"{_first_line(e)}{hint}") from None
        return
    load_torch_file(path, what=what, noun="weights file", expected=expected, mmap=True)


def load_npz(path: str | Path, *, what: str, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The arrays of a ``.npz`` / ``.npy`` file, read with ``allow_pickle=False`` (object arrays are
    pickles and are refused); ``keys``: the arrays that must be there. One ConfigError per failure."""
    import numpy as np

    path = Path(path)
    _exists(path, what, "file", "")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy: the array itself
            return {"": loaded}
        with loaded as z:
            return {k: z[k] for k in (tuple(z.files) if keys is None else keys)}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UnsafeFileError(f"{what}: {path} holds object arrays, which are pickles that could run any "
                              "code when loaded: refused; expected numeric arrays") from None
        raise ConfigError(f"{what}: cannot read {path}: ValueError: {_first_line(e)}") from None
    except KeyError as e:
        raise ConfigError(f"{what}: {path} lacks the array {e}; expected {', '.join(keys or ())}") from None
    except Exception as e:  # truncated zip, not an npz
        raise ConfigError(f"{what}: cannot read {path}: {type(e).__name__}: {_first_line(e)}") from None


__all__ = ["PLAIN", "UnsafeFileError", "check_weights_file", "load_npz", "load_torch_file"]
