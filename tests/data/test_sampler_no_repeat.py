"""data.small_classes (issue 16, defect 12): the default draws a class with fewer than K images with
replacement (the official code's behaviour), so a batch can repeat an image; ``exclude`` never repeats
an image within a batch, also across the boundary between two permutations of a class's images."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.sampler import PKBatchSampler

# class 0: 2 images (< K), class 1: 5 images (K + 1: every second batch crosses a permutation boundary),
# classes 2-5: 4, 6, 7, 9 images
LABELS = [0] * 2 + [1] * 5 + [2] * 4 + [3] * 6 + [4] * 7 + [5] * 9
K, P = 4, 3


def batches(sampler: PKBatchSampler, epochs: int = 30) -> list[list[int]]:
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [list(b) for b in sampler]
    return out


def test_default_draws_small_classes_with_replacement():
    drawn = batches(PKBatchSampler(LABELS, P, K, seed=0))
    repeats = [b for b in drawn if max(Counter(b).values()) > 1]
    assert repeats  # documented behaviour: an image can appear twice in a batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exclude_never_repeats_an_image_within_a_batch(seed):
    sampler = PKBatchSampler(LABELS, P, K, seed=seed, small_classes="exclude")
    drawn = batches(sampler)
    assert len(drawn) == 30 * len(sampler)
    labels = torch.tensor(LABELS)
    for b in drawn:
        assert len(b) == P * K and len(set(b)) == P * K, b  # K different images of P different classes
        counts = Counter(labels[b].tolist())
        assert sorted(counts.values()) == [K] * P and 0 not in counts  # the 2-image class is never drawn
    seen = Counter(i for b in drawn for i in b)
    assert all(seen[i] > 0 for i, y in enumerate(LABELS) if y != 0)  # every other image is used


def test_exclude_needs_p_classes_with_k_images():
    with pytest.raises(ConfigError, match=r"data.small_classes=exclude leaves 2 classes with at least data.K=7"):
        PKBatchSampler(LABELS, 3, 7, small_classes="exclude")
    with pytest.raises(ConfigError, match=r"data.small_classes must be one of \('replace', 'exclude'\)"):
        PKBatchSampler(LABELS, P, K, small_classes="never")
