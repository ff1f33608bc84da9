from __future__ import annotations

import pytest
import torch

from tests.policies.problems import LOSSES


@pytest.fixture(params=sorted(LOSSES))
def loss_fn(request):
    """Each real loss with a differentiable threshold (small scales: no saturation)."""
    return LOSSES[request.param]()


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one intra-op thread is as fast, and immune to the large slowdowns
    that spinning OpenMP threads suffer when other processes load the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
