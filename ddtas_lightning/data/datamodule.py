"""LightningDataModule: dataset source + transforms -> P x K train batches and query/gallery eval sets."""

from __future__ import annotations

import logging
import math
from collections import Counter

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.batch_rng import BatchSeededDataset
from ddtas_lightning.data.records import DatasetSource, SplitRecords
from ddtas_lightning.data.sampler import PKBatchSampler, ResumableDataLoader, WithMetaBatch, fit_position

log = logging.getLogger(__name__)


SELECTIONS = ("val", "test")  # where checkpoints and grid points are chosen (data.selection)


def validation_classes(classes: list, fraction: float, folds: int | None = None, fold: int = 0) -> list:
    """The held-out validation classes among the sorted train ``classes``.

    ``folds=k``: the classes cut into k contiguous, class-disjoint blocks (MLRC's cross-validation
    folds, Musgrave et al. 2020), block ``fold`` validates; ``folds=None``: the last ``fraction`` of
    the classes (the same block as fold k-1 of k when fraction = 1/k). Deterministic: nothing to record.
    """
    n = len(classes)
    if folds is not None:
        if not 2 <= folds <= n:
            raise ConfigError(f"data.val_folds={folds} must be an integer in [2, {n}] (the train split has "
                              f"{n} classes) or null")
        if not 0 <= fold < folds:
            raise ConfigError(f"data.val_fold={fold} must be an integer in [0, {folds - 1}] "
                              f"(data.val_folds={folds})")
        return classes[fold * n // folds:(fold + 1) * n // folds]
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ConfigError(
            f"data.val_fraction={fraction} leaves {n_val} of {n} train classes for validation; use a "
            "fraction giving at least 1 class to each side, data.val_folds=k, or data.selection=test "
            "(the papers' protocol: select on the test classes)"
        )
    return classes[-n_val:]


def split_off_classes(records: SplitRecords, fraction: float, folds: int | None = None,
                      fold: int = 0) -> tuple[SplitRecords, SplitRecords]:
    """Class-disjoint train/val split of a train split (see :func:`validation_classes`)."""
    val_classes = set(validation_classes(sorted(set(records.labels)), fraction, folds, fold))
    keep = [i for i, y in enumerate(records.labels) if y not in val_classes]
    held = [i for i, y in enumerate(records.labels) if y in val_classes]
    return subset(records, keep), subset(records, held)


META_SOURCES = ("train", "heldout")  # where the meta batch comes from (data.meta_source)


def split_off_meta_classes(records: SplitRecords, fraction: float) -> tuple[SplitRecords, SplitRecords]:
    """``(train, meta)``: the meta batch's own classes, the last ``fraction`` of the train classes left
    after the validation split (so class-disjoint from both the train batches and validation)."""
    n = records.num_classes
    if not 0 < round(n * fraction) < n:
        raise ConfigError(f"data.meta_fraction={fraction} leaves {round(n * fraction)} of {n} train classes for "
                          "the meta batch; use a fraction giving at least 1 class to each side")
    return split_off_classes(records, fraction)


def concatenate(first: SplitRecords, second: SplitRecords) -> SplitRecords:
    both = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
    return SplitRecords(first.paths + second.paths, first.labels + second.labels,
                        both(first.is_query, second.is_query), both(first.is_gallery, second.is_gallery))


def subset(records: SplitRecords, idx: list[int]) -> SplitRecords:
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return SplitRecords(
        [records.paths[i] for i in idx], [records.labels[i] for i in idx],
        pick(records.is_query), pick(records.is_gallery),
    )


class ShardSampler(Sampler[int]):
    """Evaluation split across DDP ranks: rank r takes items r, r + W, ...; the last shard is padded by
    repeating items so every rank runs the same number of batches. Metrics remove the repeats by
    dataset index after gathering."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.per_rank = math.ceil(n / num_replicas)

    def __iter__(self):
        padded = list(range(self.n)) + list(range(self.per_rank * self.num_replicas - self.n))
        return iter(padded[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.per_rank


class DMLDataModule(pl.LightningDataModule):
    """Builds the train (P x K batches), validation and test loaders.

    batch_size / K: global P x K batch (P = batch_size // K classes); under DDP each of the W ranks
    gets P / W classes of every global batch. selection="val" (default) validates on train classes
    held out from training (the last ``val_fraction`` of them, or fold ``val_fold`` of ``val_folds``
    class-disjoint folds), so checkpoints and sweeps never see the test classes; selection="test" is
    the papers' protocol (validate on the test split), an explicit opt-in that reports flag.
    """

    def __init__(
        self,
        source: DatasetSource,
        transform,
        batch_size: int = 32,
        K: int = 4,
        val_fraction: float = 0.25,
        selection: str = "val",
        val_folds: int | None = None,
        val_fold: int = 0,
        batches_per_epoch: int | None = None,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | str = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        on_bad_image: str = "fail",
        small_classes: str = "replace",
        meta_batch_size: int = 10,
        meta_K: int = 2,
        with_meta_batch: bool = False,
        seed: int = 0,
        meta_source: str = "train",
        meta_fraction: float = 0.25,
    ) -> None:
        super().__init__()
        check_batch_shape(batch_size, K)
        if on_bad_image not in ("fail", "skip"):
            raise ValueError(f"data.on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if selection not in SELECTIONS:
            raise ValueError(f"data.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.selection, self.val_folds, self.val_fold = selection, val_folds, val_fold
        self.source, self.transform = source, transform
        self.batch_size, self.K, self.P = batch_size, K, batch_size // K
        self.val_fraction = val_fraction
        self.batches_per_epoch = batches_per_epoch
        self.eval_batch_size = eval_batch_size
        self.loader_kwargs = dict(num_workers=num_workers, pin_memory=resolve_pin_memory(pin_memory))
        if num_workers > 0:
            self.loader_kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
        self.on_bad_image = on_bad_image
        self.small_classes = small_classes  # PKBatchSampler: replace | exclude (no image twice in a batch)
        self.with_meta_batch = with_meta_batch
        if with_meta_batch:
            if meta_K < 1 or meta_batch_size % meta_K != 0 or meta_batch_size < 2 * meta_K:
                raise ValueError(
                    f"data.meta_batch_size={meta_batch_size} must be a multiple of data.meta_K={meta_K} "
                    "with at least 2 classes"
                )
        self.meta_batch_size, self.meta_K = meta_batch_size, meta_K
        self.seed = seed
        if meta_source not in META_SOURCES:
            raise ConfigError(f"data.meta_source must be one of {', '.join(META_SOURCES)}, got {meta_source!r}")
        # heldout: the train set holds the train classes first, then the meta classes from meta_offset on
        self.meta_source, self.meta_fraction, self.meta_offset = meta_source, float(meta_fraction), None
        self.train_set = self.val_set = self.test_set = None

    def _dataset(self, records: SplitRecords, train: bool):
        from ddtas_lightning.data.image_dataset import WHITE, ImageDataset

        tf = self.transform.train if train else self.transform.test
        if hasattr(self.source, "make_dataset"):  # sources of non-image data (e.g. gaussian_clusters)
            return self.source.make_dataset(records, tf)
        # the source's dataset.source.background (Folder: emoji and other transparent PNGs), else white
        background = getattr(self.source, "background", WHITE)
        return ImageDataset(records, tf, on_bad_image=self.on_bad_image, background=background)

    def prepare_data(self) -> None:
        """Runs once per node before setup: generate the synthetic set here, not once per rank."""
        materialise = getattr(self.source, "materialise", None)
        if materialise is not None:
            materialise()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self.source.load("train")
        test = self.source.load("test")
        if self.selection == "val":
            train, val = split_off_classes(train, self.val_fraction, self.val_folds, self.val_fold)
        else:  # the papers' protocol: checkpoints are chosen on the test classes
            val = test
        self._check_classes(train)
        check_eval_split(test, "test split")
        if val is not test:
            check_eval_split(val, "validation split (data.selection=val: the held-out train classes)")
        if self.with_meta_batch and self.meta_source == "heldout":  # meta classes never in a train batch
            train, meta = split_off_meta_classes(train, self.meta_fraction)
            self.meta_offset = len(train)
            train = concatenate(train, meta)
        self.train_set = self._dataset(train, train=True)
        self.val_set = self._dataset(val, train=False)
        self.test_set = self.val_set if val is test else self._dataset(test, train=False)
        log.info(
            "data: train %d images / %d classes, val %d / %d, test %d / %d",
            len(train), train.num_classes, len(val), val.num_classes, len(test), test.num_classes,
        )

    def _check_classes(self, train: SplitRecords) -> None:
        """P x K (and the meta batch's) classes must exist in the train split; checked here, at set-up,
        rather than by the sampler when training starts (after the untrained evaluation)."""
        meta_p = self.meta_batch_size // self.meta_K if self.with_meta_batch else 0
        for p, what in ((self.P, f"data.batch_size={self.batch_size} / data.K={self.K}"),
                        (meta_p, f"data.meta_batch_size={self.meta_batch_size} / data.meta_K={self.meta_K}")):
            if p > train.num_classes:
                raise ConfigError(
                    f"{what} = {p} classes per batch, but the train split has only {train.num_classes} "
                    f"classes; use at most {train.num_classes} classes per batch (a smaller batch size or "
                    "a larger K)"
                )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _overfitting(self) -> bool:
        """``trainer.overfit_batches`` > 0: the samplers repeat the same batches every epoch (else Lightning's
        "first N batches" would be N new batches each epoch, since the epoch seeds the draw)."""
        trainer = self.trainer
        return trainer is not None and float(getattr(trainer, "overfit_batches", 0) or 0) > 0

    def train_sampler(self) -> PKBatchSampler | WithMetaBatch:
        world, rank = self._world()
        fixed = self._overfitting()
        train = PKBatchSampler(
            self.train_set.labels[:self.meta_offset], self.P, self.K, seed=self.seed,
            batches_per_epoch=self.batches_per_epoch, num_replicas=world, rank=rank,
            small_classes=self.small_classes, fixed=fixed,
        )
        if not self.with_meta_batch:
            return train
        meta = PKBatchSampler(
            self.train_set.labels[self.meta_offset or 0:], self.meta_batch_size // self.meta_K, self.meta_K,
            seed=self.seed + 1, fixed=fixed,
        )
        if self.meta_offset:  # indices of the meta part of the train set
            meta.class_members = [m + self.meta_offset for m in meta.class_members]
        return WithMetaBatch(train, meta)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        if self.trainer is not None:  # a resumed fit continues at the next batch of its epoch
            sampler.resume(*fit_position(self.trainer))
        # Augmentations are seeded per sample (batch_rng), and the loader's own generator supplies the
        # worker base seeds, so creating an iterator never draws from the global RNG (which a
        # checkpoint restores, and a resumed run would otherwise consume at a different point).
        return ResumableDataLoader(
            BatchSeededDataset(self.train_set), batch_sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed), **self.loader_kwargs,
        )

    def _eval_loader(self, dataset) -> DataLoader:
        world, rank = self._world()
        return DataLoader(
            dataset, batch_size=self.eval_batch_size,
            # one process: the same order as a SequentialSampler, which Lightning's overfit_batches expects
            sampler=SequentialSampler(dataset) if world == 1 else ShardSampler(len(dataset), world, rank),
            **self.loader_kwargs,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


def check_eval_split(records: SplitRecords, what: str) -> None:
    """A split that retrieval metrics can measure: >= 2 classes (with one class every neighbour is right:
    R@1 = MAP@R = NMI = 1.0 by construction) and a class with >= 2 images (with one image per class no
    query has a relevant gallery item: R@1 and MAP@R are NaN). Checked at set-up, before any training."""
    counts = Counter(int(y) for y in records.labels)
    n, most = len(counts), max(counts.values(), default=0)
    if n >= 2 and most >= 2:
        return
    sizes = f"{min(counts.values(), default=0)}-{most}" if n and min(counts.values()) != most else str(most)
    if n < 2:
        why = ("R@1, MAP@R and NMI would be 1.0 by construction (every neighbour is of the query's class)"
               if n else "nothing to evaluate")
    else:
        why = "no query has a relevant gallery item (R@1 and MAP@R would be NaN, NMI 1.0)"
    raise ConfigError(
        f"the {what} has {n} class{'es' if n != 1 else ''} with {sizes} image{'s' if most != 1 else ''} per "
        f"class ({len(records)} images): {why}; retrieval metrics need >= 2 classes and at least one class "
        "with >= 2 images. Check the dataset's classes and splits (dataset.source.*)"
    )


def resolve_pin_memory(value: bool | str) -> bool:
    """``data.pin_memory``: true | false | auto (pinned host memory when CUDA is available: the batch's
    copy to the GPU can then overlap compute; pinning is pointless without one)."""
    if value == "auto":
        return torch.cuda.is_available()
    if isinstance(value, bool):
        return value
    raise ConfigError(f"data.pin_memory must be true, false or auto, got {value!r}")


def check_batch_shape(batch_size: int, K: int) -> None:
    """P x K batches need K >= 2 (an anchor needs a positive) and batch_size divisible by K."""
    if K < 2:
        raise ValueError(f"data.K (images per class in a batch) must be >= 2, got {K}")
    if batch_size < 2 * K or batch_size % K != 0:
        raise ValueError(
            f"data.batch_size={batch_size} must be a multiple of data.K={K} with at least 2 classes "
            f"(e.g. {max(2, batch_size // K) * K})"
        )


__all__ = ["DMLDataModule", "ShardSampler", "check_batch_shape", "split_off_classes", "validation_classes", "SELECTIONS"]
