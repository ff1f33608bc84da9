"""R@K is meaningless when K is not smaller than the gallery: say so, once per split, in the log.

With ``recall_ks=[1, 1000]`` on a 24-image test split, every query's gallery (the 23 other images)
lies within its 1000 nearest neighbours, so R@1000 = 100% whatever the model. The metric is still
computed (metrics.json keeps a stable set of keys); :class:`RecallAtKCheck` logs one warning naming the
split, the K and the gallery size the first time each split is evaluated.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl

log = logging.getLogger(__name__)


def gallery_size(dataset) -> int | None:
    """Gallery items each query is ranked against: the gallery, less the query itself when queries are
    gallery items too (query == gallery, self excluded); ``None`` for a dataset without roles."""
    is_gallery = getattr(dataset, "is_gallery", None)
    is_query = getattr(dataset, "is_query", None)
    if is_gallery is None or is_query is None:
        return None
    size = int(is_gallery.sum())
    return size - 1 if bool((is_gallery & is_query).any()) else size


def uninformative_ks(recall_ks, gallery: int) -> list[int]:
    """The K with R@K = 100% by construction (K >= the gallery size)."""
    return [int(k) for k in recall_ks if int(k) >= gallery]


class RecallAtKCheck(pl.Callback):
    """Warn once per split when a ``metrics.recall_ks`` entry is >= the split's gallery size."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        if split in self.warned:
            return
        dataset = getattr(getattr(trainer, "datamodule", None), f"{split}_set", None)
        gallery = gallery_size(dataset) if dataset is not None else None
        ks = getattr(pl_module, "recall_ks", ())
        if gallery is None or not ks:
            return
        self.warned.add(split)
        bad = uninformative_ks(ks, gallery)
        if bad:
            log.warning(
                "metrics.recall_ks: %s on the %s split, whose queries each rank only %d gallery items: "
                "R@K = 100%% by construction for K >= %d and says nothing about the model; use K < %d",
                ", ".join(f"R@{k}" for k in bad), split, gallery, gallery, gallery,
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, "val")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module, "test")
