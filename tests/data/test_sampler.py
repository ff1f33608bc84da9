from collections import Counter

import pytest
import torch

from ddtas_lightning.data.sampler import PKBatchSampler


def labels_of(n_classes, per_class):
    return torch.arange(n_classes).repeat_interleave(per_class)


def test_every_batch_is_p_classes_by_k_images():
    labels = labels_of(10, 7)
    sampler = PKBatchSampler(labels, P=4, K=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 12
    for batch in batches:
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        assert len(set(batch)) == 12  # no image twice in a batch when every class has >= K images


def test_classes_drawn_evenly_and_images_cycled():
    labels = labels_of(8, 4)
    sampler = PKBatchSampler(labels, P=4, K=2, seed=0, batches_per_epoch=16)
    seen = Counter(i for batch in sampler for i in batch)
    # 16 batches x 8 images = 128 draws over 32 images: every image exactly 4 times
    assert set(seen.values()) == {4}


def test_seeded_and_epoch_dependent():
    labels = labels_of(12, 5)
    a, b = PKBatchSampler(labels, 4, 2, seed=3), PKBatchSampler(labels, 4, 2, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = PKBatchSampler(labels, 4, 2, seed=4)
    assert list(a) != list(c)


def test_ranks_split_the_global_batch_by_class():
    labels = labels_of(12, 6)
    single = list(PKBatchSampler(labels, P=4, K=3, seed=7))
    ranks = [list(PKBatchSampler(labels, P=4, K=3, seed=7, num_replicas=2, rank=r)) for r in range(2)]
    for step, batch in enumerate(single):
        parts = [ranks[0][step], ranks[1][step]]
        assert sorted(parts[0] + parts[1]) == sorted(batch)
        assert not set(labels[parts[0]].tolist()) & set(labels[parts[1]].tolist())
        assert all(len(p) == 6 for p in parts)


def test_small_class_sampled_with_replacement_and_reported_once(caplog):
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # class 2 has one image
    with caplog.at_level("WARNING"):
        sampler = PKBatchSampler(labels, P=3, K=2, seed=0, batches_per_epoch=5)
        batches = list(sampler)
    assert sum("fewer than K=2" in r.message for r in caplog.records) == 1
    for batch in batches:
        assert Counter(labels[batch].tolist())[2] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(P=5, K=2), "only 4"),
        (dict(P=2, K=0), "data.K"),
        (dict(P=3, K=2, num_replicas=2), "not divisible"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(labels_of(4, 3), **kwargs)


def test_meta_batch_appended_from_its_own_stream():
    from ddtas_lightning.data.sampler import WithMetaBatch

    labels = labels_of(10, 6)
    train = PKBatchSampler(labels, P=4, K=3, seed=0)
    combined = WithMetaBatch(PKBatchSampler(labels, P=4, K=3, seed=0), PKBatchSampler(labels, 5, 2, seed=1))
    plain = list(train)
    batches = list(combined)
    assert len(batches) == len(plain)
    for batch, alone in zip(batches, plain):
        assert batch[:12] == alone
        meta = Counter(labels[batch[12:]].tolist())
        assert len(meta) == 5 and set(meta.values()) == {2}
    combined.set_epoch(1)
    assert [b[12:] for b in combined] != [b[12:] for b in batches]


# ---- mid-epoch resume and per-batch augmentation seeds ----------------------------------------------
from types import SimpleNamespace  # noqa: E402

from torch.utils.data import DataLoader, Dataset  # noqa: E402

from ddtas_lightning.data.batch_rng import BatchSeededDataset, SeededBatch  # noqa: E402
from ddtas_lightning.data.sampler import WithMetaBatch, fit_position  # noqa: E402


def with_seeds(batches):
    return [(list(b), b.seed) for b in batches]


@pytest.mark.parametrize("meta", [False, True])
def test_resume_continues_with_the_next_batch_of_the_epoch(meta):
    labels = labels_of(10, 6)

    def make():
        train = PKBatchSampler(labels, 4, 2, seed=5, batches_per_epoch=7)
        return WithMetaBatch(train, PKBatchSampler(labels, 2, 2, seed=6)) if meta else train

    full = make()
    full.set_epoch(3)
    epoch3 = with_seeds(full)
    resumed = make()
    resumed.resume(3, 4)
    assert with_seeds(resumed) == epoch3[4:]
    assert with_seeds(resumed) == epoch3  # the offset applies to one iteration only
    resumed.resume(3, 7)
    assert list(resumed) == []  # resumed after the epoch's last batch: nothing left of it
    resumed.resume(3, 2)
    resumed.set_epoch(4)  # a new epoch drops a pending offset
    full.set_epoch(4)
    assert with_seeds(resumed) == with_seeds(full)


def test_resume_offset_survives_an_unstarted_iterator():
    """DataLoader creates (and drops) one iterator before the one it uses; only a started iteration
    consumes the offset."""
    sampler = PKBatchSampler(labels_of(8, 4), 2, 2, seed=0, batches_per_epoch=5)
    sampler.resume(1, 3)
    iter(sampler)
    assert len(list(sampler)) == 2


def test_batch_seeds_depend_on_seed_epoch_position_and_rank():
    labels = labels_of(12, 6)
    a = PKBatchSampler(labels, 4, 3, seed=7)
    seeds = [b.seed for b in a]
    assert len(set(seeds)) == len(seeds) and all(isinstance(b, SeededBatch) for b in a)
    assert seeds == [b.seed for b in PKBatchSampler(labels, 4, 3, seed=7)]
    a.set_epoch(1)
    assert not set(seeds) & {b.seed for b in a}
    ranks = [[b.seed for b in PKBatchSampler(labels, 4, 3, seed=7, num_replicas=2, rank=r)] for r in (0, 1)]
    assert all(s0 != s1 for s0, s1 in zip(*ranks))  # ranks do not share augmentation draws


def test_resume_bounds_are_checked():
    with pytest.raises(ValueError, match="cannot resume after 6 of 5"):
        PKBatchSampler(labels_of(8, 4), 2, 2, batches_per_epoch=5).resume(0, 6)


class RandomItems(Dataset):
    """An 'augmentation' that draws from all three global generators."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        import random

        import numpy as np

        return torch.tensor([float(i), torch.rand(()).item(), random.random(), float(np.random.rand())])


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentations_depend_only_on_the_batch_not_on_workers_or_history(workers):
    labels = labels_of(10, 4)

    def load(sampler, workers):
        # as the data module does: the loader's own generator, so making an iterator draws nothing
        # from the global one
        loader = DataLoader(BatchSeededDataset(RandomItems()), batch_sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        return [b for b in loader]

    sampler = PKBatchSampler(labels, 2, 2, seed=1, batches_per_epoch=6)
    reference = load(sampler, 0)
    torch.manual_seed(123)  # a different history in the main process and in the workers
    state = torch.get_rng_state()
    resumed = PKBatchSampler(labels, 2, 2, seed=1, batches_per_epoch=6)
    resumed.resume(0, 2)
    got = load(resumed, workers)
    assert len(got) == 4
    for a, b in zip(got, reference[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if workers == 0:  # loading in the main process left its generator where it was
        assert torch.equal(torch.get_rng_state(), state)
    assert len({float(b[0, 1]) for b in reference}) == len(reference)  # batches do differ


def test_fit_position_reads_the_restored_loop_progress():
    def trainer(ready, started, processed, batches):
        epoch = SimpleNamespace(ready=ready, started=started, processed=processed)
        return SimpleNamespace(fit_loop=SimpleNamespace(
            epoch_progress=SimpleNamespace(current=epoch),
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=batches))),
        ))

    assert fit_position(trainer(0, 0, 0, 0)) == (0, 0)  # a fresh fit
    assert fit_position(trainer(2, 2, 1, 3)) == (1, 3)  # saved after batch 3 of epoch 1
    assert fit_position(trainer(2, 2, 2, 8)) == (2, 0)  # saved at the end of epoch 1: epoch 2 next
