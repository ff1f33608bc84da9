"""Per-batch augmentation seeds, so that the random augmentations of a train batch depend only on
(seed, epoch, batch index within the epoch, DDP rank) and not on process history.

Why: with DataLoader workers, each worker draws its augmentations from its own RNG stream, seeded once
per epoch (or once per run with ``persistent_workers``) and advanced by every batch the worker has
loaded so far. A run resumed in the middle of an epoch starts fresh workers, so its augmentations
would differ from an uninterrupted run's; they would also change with ``data.num_workers``. Seeding
each batch from its position instead makes them identical after a resume, for any number of workers.
(One seed per batch rather than per sample: reseeding costs ~20 us, negligible per batch but not per
sample of a vector data set with a tiny model.)

The train batch sampler yields :class:`SeededBatch` lists; :class:`BatchSeededDataset` wraps the train
dataset and, in ``__getitems__`` (which DataLoader calls with the whole batch), seeds the global
python / numpy / torch CPU generators with the batch's seed, loads the batch's samples in order, and
restores the generators afterwards, so the calling process (the main process when ``num_workers=0``)
sees no change to its own random state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): stable across processes and Python versions,
    unlike ``hash`` of a tuple, and well spread for neighbouring inputs (epoch 3 vs 4, batch 7 vs 8)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class SeededBatch(list):
    """A list of dataset indices carrying the seed of its batch (a list subclass pickles its attributes,
    so the seed reaches DataLoader worker processes with the indices)."""

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = int(seed)


@contextmanager
def isolated_global_rng() -> Iterator[None]:
    """Restore python / numpy / torch-CPU global random states on exit (CUDA generators untouched)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


def seed_global_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also reseed CUDA


class BatchSeededDataset(Dataset):
    """Wraps a map-style dataset; the items of a :class:`SeededBatch` are produced, in order, with the
    global generators seeded by ``batch.seed``. Other requests pass through. Attributes of the wrapped
    dataset (``labels``, ``is_query``, ...) are reachable on the wrapper."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> list:
        seed = getattr(indices, "seed", None)
        if seed is None:
            return [self.dataset[i] for i in indices]
        with isolated_global_rng():
            seed_global_rng(seed)
            return [self.dataset[i] for i in indices]

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
