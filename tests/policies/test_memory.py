"""SemiGlobalMemory (MMSI's per-class FIFO) against a plain dict-of-deques reference."""

from __future__ import annotations

import copy
from collections import deque

import pytest
import torch

from ddtas_lightning.memory import SemiGlobalMemory


def _batches(n: int, seed: int = 0, dim: int = 3, classes: int = 5, size: int = 7):
    g = torch.Generator().manual_seed(seed)
    start = 0
    for _ in range(n):
        labels = torch.randint(classes, (size,), generator=g) * 10 + 3  # arbitrary, sparse label values
        yield torch.randn(size, dim, generator=g), labels, torch.arange(start, start + size)
        start += size


def _reference(batches, size_per_class: int):
    """Official form (spec mmsi.md §2): dict label -> deque, append each row, drop the oldest."""
    queues: dict[int, deque] = {}
    for emb, labels, indices in batches:
        for e, y, i in zip(emb, labels.tolist(), indices.tolist()):
            q = queues.setdefault(y, deque())
            q.append((e, i))
            if len(q) > size_per_class:
                q.popleft()
    emb, lab, idx = [], [], []
    for y in sorted(queues):
        for e, i in queues[y]:
            emb.append(e)
            lab.append(y)
            idx.append(i)
    return torch.stack(emb), torch.tensor(lab), torch.tensor(idx)


@pytest.mark.parametrize("size_per_class", [1, 2, 4, 100])
def test_fifo_order_and_size_limit_match_the_reference(size_per_class):
    batches = list(_batches(6))
    memory = SemiGlobalMemory(size_per_class)
    for emb, labels, indices in batches:
        memory.enqueue(emb, labels, indices)
    emb, labels, indices = memory.entries()
    ref_emb, ref_labels, ref_indices = _reference(batches, size_per_class)
    assert torch.equal(labels, ref_labels) and torch.equal(indices, ref_indices)
    assert torch.equal(emb, ref_emb)
    counts = torch.unique(labels, return_counts=True)[1]
    assert counts.max() <= size_per_class
    assert len(memory) == len(labels) and memory.num_classes == len(counts)
    if size_per_class < 100:
        assert counts.max() == size_per_class  # the limit was reached, so dropping was exercised


def test_entries_are_detached_and_new_rows_keep_batch_order():
    memory = SemiGlobalMemory(2)
    emb = torch.randn(4, 3, requires_grad=True)
    memory.enqueue(emb * 2, torch.tensor([7, 7, 7, 1]), torch.tensor([0, 1, 2, 3]))
    e, labels, indices = memory.entries()
    assert not e.requires_grad
    assert labels.tolist() == [1, 7, 7] and indices.tolist() == [3, 1, 2]  # class order; the newest two of 7
    memory.enqueue(torch.randn(1, 3), torch.tensor([1]))  # indices unknown: -1
    assert memory.entries()[2].tolist() == [3, -1, 1, 2]


def test_warm_up_counts_distinct_classes():
    memory = SemiGlobalMemory(size_per_class=3, warmup_classes=3)
    assert not memory.ready and memory.num_classes == 0
    memory.enqueue(torch.randn(4, 2), torch.tensor([5, 5, 5, 5]))
    memory.enqueue(torch.randn(2, 2), torch.tensor([2, 2]))
    assert memory.num_classes == 2 and not memory.ready  # 4 + 2 entries, but 2 classes
    memory.enqueue(torch.randn(1, 2), torch.tensor([9]))
    assert memory.ready and len(memory) == 3 + 2 + 1
    assert not SemiGlobalMemory(warmup_classes=0).ready  # empty: nothing to score against
    with pytest.raises(ValueError, match="memory_size_per_class"):
        SemiGlobalMemory(size_per_class=0)
    with pytest.raises(ValueError, match="width"):
        memory.enqueue(torch.randn(1, 5), torch.tensor([1]))


def test_device_and_dtype_follow_the_first_rows_and_the_module():
    memory = SemiGlobalMemory(2)
    memory.enqueue(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1]))
    assert memory.embeddings.dtype == torch.float64  # adopted from the data
    memory.enqueue(torch.randn(1, 4), torch.tensor([2]))  # later rows are converted to the store's dtype
    assert memory.embeddings.dtype == torch.float64 and len(memory) == 4
    memory.float()  # buffers move (and convert) with the module
    assert memory.embeddings.dtype == torch.float32 and memory.labels.dtype == torch.long
    assert {name for name, _ in memory.named_buffers()} == {"embeddings", "labels", "indices"}
    if torch.cuda.is_available():
        memory.cuda()
        memory.enqueue(torch.randn(2, 4), torch.tensor([3, 3]))  # CPU rows land on the store's device
        assert memory.embeddings.is_cuda and memory.labels.is_cuda and len(memory) == 6


def test_state_dict_round_trip_including_growth():
    batches = list(_batches(5, seed=1))
    memory = SemiGlobalMemory(3, warmup_classes=2)
    for b in batches[:3]:
        memory.enqueue(*b)
    state = copy.deepcopy(memory.state_dict())
    assert state["embeddings"].shape[0] == len(memory) > 0

    fresh = SemiGlobalMemory(3, warmup_classes=2)  # empty: every buffer must grow to the saved size
    fresh.load_state_dict(state)  # strict
    grown = SemiGlobalMemory(3, warmup_classes=2)  # larger than the state: must shrink
    for b in batches:
        grown.enqueue(*b)
    grown.load_state_dict(state)
    for restored in (fresh, grown):
        for name, value in state.items():
            assert torch.equal(getattr(restored, name), value), name
        assert restored.ready and restored.num_classes == memory.num_classes
    # continuing after the restore equals continuing the original
    for b in batches[3:]:
        memory.enqueue(*b)
        fresh.enqueue(*b)
    for name, value in memory.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # inside a parent module (as policy.memory in a checkpoint)
    parent, saved = torch.nn.Module(), torch.nn.Module()
    parent.memory, saved.memory = SemiGlobalMemory(3), memory
    parent.load_state_dict(saved.state_dict())
    assert torch.equal(parent.memory.embeddings, memory.embeddings)
    fresh.clear()
    assert len(fresh) == 0 and not fresh.ready and fresh.embeddings.shape[1] == 3


def test_enqueue_is_vectorised_and_fast_for_a_large_store():
    """SOP-like: thousands of classes. A Python loop over rows or classes would take seconds."""
    import time

    memory = SemiGlobalMemory(50)
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(40):
        labels = torch.randint(5000, (80,), generator=g)
        memory.enqueue(torch.randn(80, 64, generator=g), labels, torch.arange(80) + 80 * step)
    assert time.perf_counter() - started < 2.0
    assert len(memory) == 40 * 80  # no class reached 50 entries: nothing dropped
    assert memory.num_classes == len(torch.unique(memory.labels))
