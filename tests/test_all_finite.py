"""``module.all_finite``: the training step's one-sync check that no gradient holds NaN or +-inf,
against the plain per-element definition."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.module import all_finite


def reference(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_matches_the_elementwise_definition(dtype, bad):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 300, 4096)]
    if bad is not None:
        tensors[2][123] = bad
    assert all_finite(tensors) == reference(tensors) == (bad is None)


def test_large_finite_values_do_not_overflow_in_half_precision():
    tensors = [torch.full((10_000,), 60_000.0, dtype=torch.float16), torch.full((3,), 1e38, dtype=torch.bfloat16)]
    assert reference(tensors) and all_finite(tensors)  # the fp16 sum (6e8) would be inf in fp16


def test_mixed_dtypes_and_empty():
    assert all_finite([])
    assert all_finite([torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float16)])
    assert not all_finite([torch.ones(3, dtype=torch.float64), torch.tensor([float("nan")], dtype=torch.float16)])
