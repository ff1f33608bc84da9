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
