"""P x K batch sampler: each batch holds P classes with K images each. Seeded and rank-aware."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.data.batch_rng import SeededBatch, mix_seed

log = logging.getLogger(__name__)

SMALL_CLASSES = ("replace", "exclude")  # data.small_classes (see PKBatchSampler)


class PKBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices, P classes x K images per *global* batch.

    One epoch is ``batches_per_epoch`` global batches (default: as many as cover the dataset once,
    ``len(labels) // (P * K)``). Classes are taken from successive random permutations of the class
    list, so every class is drawn equally often; within a class, images come from successive random
    permutations too, so every image is seen before any repeats.

    ``small_classes`` decides what happens to a class with fewer than K images:

    - ``"replace"`` (default, as the official DDTAS / MS code): its K images are drawn *with
      replacement*, so a batch can hold one image twice and pair it with itself as a "positive" (the
      self pair is excluded by index, but its copy is not). Reported once as a warning.
    - ``"exclude"``: such classes are never drawn, and a class's K images are always K different
      images (also across the boundary between two permutations of a class's images): no image
      repeats within a batch. The split must keep at least P classes with K images.

    DDP: ``num_replicas`` ranks split each global batch by classes, rank r getting the r-th
    contiguous block of P/W classes (P must be divisible by W). One process with batch P x K and W
    processes with (P/W) x K each therefore see exactly the same images at every step, and the
    rank-order concatenation of the shares (what the training step gathers) is the single-process
    batch in the same order, so even order-dependent draws (random miners) agree. Randomness depends
    only on (seed, epoch): call :meth:`set_epoch` each epoch.

    Each batch is a :class:`SeededBatch` whose seed is ``mix_seed(seed, epoch, batch index, rank)``,
    with which :class:`~ddtas_lightning.data.batch_rng.BatchSeededDataset` draws its augmentations.
    Mid-epoch resume: :meth:`resume` (epoch, batches already trained on) makes the next iteration
    start at the following batch of that epoch, with the same indices and seeds as in the
    uninterrupted run.

    ``fixed=True``: every epoch repeats epoch 0's batches, the same images with the same augmentation seeds
    (``trainer.overfit_batches``, ``debug=overfit``: Lightning keeps the first N batches of each epoch, which
    without it are N new batches every epoch, since the epoch seeds the draw).
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        P: int,
        K: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        small_classes: str = "replace",
        fixed: bool = False,
    ) -> None:
        check_choice("data.small_classes", small_classes, SMALL_CLASSES)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if K < 1:
            raise ValueError(f"data.K (images per class) must be >= 1, got {K}")
        if P < 1:
            raise ValueError(f"data.P (classes per batch) must be >= 1, got {P}")
        classes, inverse = torch.unique(labels, return_inverse=True)
        if len(classes) < P:
            raise ValueError(
                f"P x K sampler: a batch needs P={P} distinct classes but the split has only {len(classes)}"
            )
        if P % num_replicas != 0:
            raise ValueError(f"data.P={P} classes per batch is not divisible by the {num_replicas} DDP ranks")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.P, self.K, self.seed = P, K, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.class_members = [torch.nonzero(inverse == c, as_tuple=True)[0] for c in range(len(classes))]
        small = [int(classes[c]) for c, m in enumerate(self.class_members) if len(m) < K]
        self.no_repeats = small_classes == "exclude"
        if self.no_repeats and small:
            self.class_members = [m for m in self.class_members if len(m) >= K]
            if len(self.class_members) < P:
                raise ConfigError(
                    f"data.small_classes=exclude leaves {len(self.class_members)} classes with at least "
                    f"data.K={K} images, fewer than the P={P} classes a batch needs; use a smaller K or batch, "
                    "or data.small_classes=replace"
                )
            log.warning("P x K sampler: %d class(es) have fewer than K=%d images and are left out "
                        "(data.small_classes=exclude; e.g. class ids %s)", len(small), K, small[:5])
        elif small:
            log.warning(
                "P x K sampler: %d class(es) have fewer than K=%d images and are sampled with replacement "
                "(e.g. class ids %s)", len(small), K, small[:5],
            )
        self.batches_per_epoch = batches_per_epoch or max(1, len(labels) // (P * K))
        self.fixed = bool(fixed)
        self.epoch = 0
        self._skip = 0  # batches of self.epoch to skip in the next iteration (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0  # a resume offset belongs to the epoch it was set for
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after its first ``batches_done`` batches (the next iteration only)."""
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"cannot resume after {batches_done} of {self.batches_per_epoch} batches")
        self.epoch, self._skip = epoch, batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "skip": self._skip}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume(state["epoch"], state["skip"])

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _draw_epoch(self, epoch: int) -> int:
        """The epoch whose batches (and augmentation seeds) are drawn: epoch 0 every time when ``fixed``."""
        return 0 if self.fixed else epoch

    def _global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._draw_epoch(self.epoch))
        n_classes = len(self.class_members)
        class_queue: list[int] = []
        image_queues: list[list[int]] = [[] for _ in range(n_classes)]
        batches = []
        for _ in range(self.batches_per_epoch):
            chosen: list[int] = []
            while len(chosen) < self.P:
                if not class_queue:
                    class_queue = torch.randperm(n_classes, generator=g).tolist()
                c = class_queue.pop()
                if c in chosen:  # a permutation boundary can repeat a class; push it to the next batch
                    class_queue.insert(0, c)
                    continue
                chosen.append(c)
            batch = []
            for c in chosen:
                members = self.class_members[c]
                if len(members) < self.K:
                    picks = torch.randint(len(members), (self.K,), generator=g)
                    batch.append(members[picks].tolist())
                    continue
                queue = image_queues[c]
                if len(queue) < self.K:
                    queue.extend(members[torch.randperm(len(members), generator=g)].tolist())
                if self.no_repeats:
                    batch.append(_take_distinct(queue, self.K))
                    continue
                batch.append(queue[: self.K])
                del queue[: self.K]
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: nothing below runs (and the resume offset is not consumed) until the first
        # batch is requested; DataLoader creates and discards one unstarted iterator per epoch.
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        for b, batch in enumerate(self._global_batches()):
            if b < skip:
                continue
            share = self.P // self.num_replicas
            mine = batch[self.rank * share : (self.rank + 1) * share]
            seed = mix_seed(self.seed, self._draw_epoch(epoch), b, self.rank)
            yield SeededBatch([i for members in mine for i in members], seed)


def _take_distinct(queue: list[int], k: int) -> list[int]:
    """The first ``k`` *different* indices of ``queue``, removed from it; an index met again (the
    leftovers of one permutation followed by the next) stays queued for a later batch."""
    taken: list[int] = []
    seen: set[int] = set()
    rest: list[int] = []
    for pos, i in enumerate(queue):
        if len(taken) == k:
            rest.extend(queue[pos:])
            break
        if i in seen:
            rest.append(i)
        else:
            seen.add(i)
            taken.append(i)
    queue[:] = rest
    return taken


class WithMetaBatch(Sampler[list[int]]):
    """Appends a meta batch (P_m x K_m from the same split, its own seed) to every train batch.

    Meta-learning policies (``threshold_policy=meta``) evaluate a virtual step on it; the module splits
    the concatenated batch at ``len(train batch)``. Every DDP rank draws the same meta batch.
    """

    def __init__(self, train: PKBatchSampler, meta: PKBatchSampler) -> None:
        self.train, self.meta = train, meta
        self.meta.batches_per_epoch = len(train)

    def set_epoch(self, epoch: int) -> None:
        self.train.set_epoch(epoch)
        self.meta.set_epoch(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        self.train.resume(epoch, batches_done)
        self.meta.resume(epoch, batches_done)

    def state_dict(self) -> dict[str, int]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume(state["epoch"], state["skip"])

    @property
    def epoch(self) -> int:
        return self.train.epoch

    def __len__(self) -> int:
        return len(self.train)

    def __iter__(self) -> Iterator[list[int]]:
        for batch, meta in zip(self.train, self.meta):
            yield SeededBatch(batch + meta, batch.seed)  # the meta part is augmented like the train part


def fit_position(trainer) -> tuple[int, int]:
    """(epoch, batches of it already trained on) where ``trainer.fit`` continues, read from the loop
    progress Lightning restored from a checkpoint (before the train dataloader is requested).

    Lightning keeps the epoch's batch count across a mid-epoch restart but, for a plain DataLoader,
    starts the loader again from its first batch; the P x K sampler is resumed from this instead. The
    epoch is the fit loop's ``epoch_progress.current.processed`` (what Lightning passes to samplers'
    ``set_epoch``): after a checkpoint written at an epoch's end it is already the next epoch, while
    ``trainer.current_epoch`` is only updated later.
    """
    fit_loop = trainer.fit_loop
    epoch = fit_loop.epoch_progress.current.processed
    # Batches count only while the epoch is unfinished (started but not processed); the counter
    # still holds the previous epoch's total after an end-of-epoch checkpoint.
    if fit_loop.epoch_progress.current.started > epoch:
        return epoch, int(fit_loop.epoch_loop.batch_progress.current.processed)
    return epoch, 0


class ResumableDataLoader(DataLoader):
    """The train DataLoader, declared resumable to Lightning (which warns on a mid-epoch resume of a
    loader without ``state_dict`` / ``load_state_dict``, because it would restart the epoch's batches).

    Its position is not kept here: the data module positions the batch sampler from the loop progress
    restored with the checkpoint (:func:`fit_position`), which counts the batches actually trained on;
    a loader-side count would also include batches that workers and Lightning had prefetched but not
    yet used. So the loader's own state is empty.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see the class docstring)."""
