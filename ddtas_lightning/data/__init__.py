"""Datasets: loaders (file layouts -> :class:`SplitRecords`), :class:`ImageDataset` and transforms."""

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

__all__ = [
    "BNInceptionTransform",
    "CUB200",
    "Cars196",
    "DatasetLayoutError",
    "DatasetSource",
    "Folder",
    "Glyphs",
    "ImageDataset",
    "ImageNetTransform",
    "InShop",
    "SOP",
    "SimpleTransform",
    "SplitRecords",
    "Synthetic",
    "TimmTransform",
    "TransformPair",
]
