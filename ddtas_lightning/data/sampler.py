"""P x K batch sampler: each batch holds P classes with K images each. Seeded and rank-aware."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class PKBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices, P classes x K images per *global* batch.

    One epoch is ``batches_per_epoch`` global batches (default: as many as cover the dataset once,
    ``len(labels) // (P * K)``). Classes are taken from successive random permutations of the class
    list, so every class is drawn equally often; within a class, images come from successive random
    permutations too, so every image is seen before any repeats. A class with fewer than K images is
    sampled with replacement (reported once).

    DDP: ``num_replicas`` ranks split each global batch by classes, rank r getting classes
    ``r, r + W, ...`` (P must be divisible by W). One process with batch P x K and W processes with
    (P/W) x K each therefore see exactly the same images at every step, which is what makes the two
    set-ups comparable. Randomness depends only on (seed, epoch): call :meth:`set_epoch` each epoch.
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
    ) -> None:
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
        if small:
            log.warning(
                "P x K sampler: %d class(es) have fewer than K=%d images and are sampled with replacement "
                "(e.g. class ids %s)", len(small), K, small[:5],
            )
        self.batches_per_epoch = batches_per_epoch or max(1, len(labels) // (P * K))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
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
                batch.append(queue[: self.K])
                del queue[: self.K]
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            mine = batch[self.rank :: self.num_replicas]
            yield [i for members in mine for i in members]


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

    def __len__(self) -> int:
        return len(self.train)

    def __iter__(self) -> Iterator[list[int]]:
        for batch, meta in zip(self.train, self.meta):
            yield batch + meta
