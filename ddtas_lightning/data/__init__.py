"""Datasets: loaders (file layouts -> :class:`SplitRecords`), :class:`ImageDataset` and transforms.

The names below are imported on first use (PEP 562 ``__getattr__``), not with the package: the
commands under it (``python -m ddtas_lightning.data.prepare``, ``...cached_features``) would otherwise load
torchvision and every loader before printing ``--help`` (benchmarks/bench_startup.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it
_WHERE = {
    "BNInceptionTransform": "transforms",
    "CUB200": "cub200",
    "Cars196": "cars196",
    "DatasetLayoutError": "records",
    "DatasetSource": "records",
    "Folder": "folder",
    "Glyphs": "glyphs",
    "ImageDataset": "image_dataset",
    "ImageNetTransform": "transforms",
    "InShop": "inshop",
    "SOP": "sop",
    "SimpleTransform": "transforms",
    "SplitRecords": "records",
    "Synthetic": "synthetic",
    "TimmTransform": "transforms",
    "TransformPair": "transforms",
}

__all__ = [
    "BNInceptionTransform", "CUB200", "Cars196", "DatasetLayoutError", "DatasetSource", "Folder", "Glyphs",
    "ImageDataset", "ImageNetTransform", "InShop", "SOP", "SimpleTransform", "SplitRecords", "Synthetic",
    "TimmTransform", "TransformPair",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # for type checkers and readers; at run time __getattr__ imports them
    from ddtas_lightning.data.cars196 import Cars196
    from ddtas_lightning.data.cub200 import CUB200
    from ddtas_lightning.data.folder import Folder
    from ddtas_lightning.data.glyphs import Glyphs
    from ddtas_lightning.data.image_dataset import ImageDataset
    from ddtas_lightning.data.inshop import InShop
    from ddtas_lightning.data.records import DatasetLayoutError, DatasetSource, SplitRecords
    from ddtas_lightning.data.sop import SOP
    from ddtas_lightning.data.synthetic import Synthetic
    from ddtas_lightning.data.transforms import (
        BNInceptionTransform,
        ImageNetTransform,
        SimpleTransform,
        TimmTransform,
        TransformPair,
    )
