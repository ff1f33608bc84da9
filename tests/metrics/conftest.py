"""The metric tests use tiny tensors: run them single-threaded (restored afterwards).

Multi-threading buys nothing at these sizes, and on a loaded machine OpenMP barrier waits make thousands of tiny
ops 10-30x slower (seen on the shared 2-core dev box: 22 s vs 0.7 s for one test).
"""

from __future__ import annotations

import faiss
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_threaded():
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)
