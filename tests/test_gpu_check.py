"""``make gpu-check`` (benchmarks/gpu_check.py) stays alive on machines without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_every_row_is_skipped_and_it_exits_0():
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_check import ROWS, SKIPPED

    out = run()
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.splitlines()
    for row in ROWS:
        assert any(line.startswith(row) and line.rstrip().endswith(SKIPPED) for line in table), row


@pytest.mark.slow
def test_every_check_runs_on_cpu_with_tiny_sizes():
    """The code paths of the GPU rows, on CPU (what a CUDA run does, minus CUDA-only parts)."""
    out = run("--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.rindex("check "):]
    assert "FAILED" not in table
    for row in ("precision bf16-mixed", "precision bf16-true"):  # lambda learned, float32
        line = next(x for x in table.splitlines() if x.startswith(row))
        assert line.rstrip().endswith("met"), line
    for row in ("static: framework", "meta jvp", "meta exact", "mmsi jvp", "faiss k-NN", "k-means"):
        assert any(x.startswith(row) for x in table.splitlines()), row
