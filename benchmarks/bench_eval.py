"""Evaluation cost: our RetrievalMetrics (torch and faiss k-NN) vs pytorch-metric-learning's AccuracyCalculator.

Synthetic embeddings with SOP-like class structure (classes of 2-12 images, unit vectors around class centres).
Every method runs in its own fresh subprocess on the same embeddings (written once to a temporary .npy), so peak
memory is measured cleanly: the worker resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) after
imports and loading, and reports ``VmHWM - RSS before`` (the extra resident memory the evaluation needed). Python-
level allocations are not a useful measure here (torch and faiss allocate outside tracemalloc).

PML is run as its docs recommend for large sets: ``k="max_bin_count"`` (its default ``k=None`` asks for an
``N x N`` neighbour table). Both sides compute R@1 (PML: precision_at_1), R-Precision and MAP@R, plus NMI unless
``--no-nmi``; ours also computes R@2/4/8.

    python benchmarks/bench_eval.py               # N=20,000 x 128-d  (about a minute on 2 cores)
    python benchmarks/bench_eval.py --full        # N=60,502 x 512-d  (SOP test set; several minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("ours-torch", "ours-faiss", "pml")


def sop_like(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit class centres plus Gaussian noise; noise grows with dim so that R@1 stays around 0.6-0.8."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 13)))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 2:  # keep every class at >= 2 images
        sizes[-2] += sizes.pop()
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = 1.6 * (dim / 128) ** 0.3
    emb = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return np.ascontiguousarray(emb[perm]), labels[perm].astype(np.int64)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(method: str, data: str, nmi: bool) -> None:
    import torch

    z = np.load(data)
    emb, labels = torch.from_numpy(z["emb"]), torch.from_numpy(z["labels"])
    if method == "pml":
        import logging

        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        logging.getLogger("PML").setLevel(logging.ERROR)
        include = ("precision_at_1", "r_precision", "mean_average_precision_at_r") + (("NMI",) if nmi else ())
        calc = AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"))

        def run() -> dict:
            out = calc.get_accuracy(emb, labels)
            names = {
                "precision_at_1": "R@1",
                "r_precision": "R-Precision",
                "mean_average_precision_at_r": "MAP@R",
            }
            return {names.get(k, k): float(v) for k, v in out.items()}
    else:
        from ddtas_lightning.metrics import RetrievalMetrics

        def run() -> dict:
            metric = RetrievalMetrics(backend=method.split("-")[1], nmi=nmi, nmi_seed=1234)
            metric.update(emb, labels, torch.arange(len(emb)))
            return {k: float(v) for k, v in metric.compute().items()}

    rss_before = _rss_kib("VmRSS")
    try:  # reset the peak-RSS counter so VmHWM covers the evaluation only
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    values = run()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "method": method,
                "seconds": seconds,
                "peak_extra_mib": max(0, peak - rss_before) / 1024,
                "hwm_reset": hwm_reset,
                "values": values,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--full", action="store_true", help="SOP test-set size: N=60,502, 512-d")
    parser.add_argument("--no-nmi", dest="nmi", action="store_false", help="skip k-means/NMI on both sides")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.nmi)
        return
    if args.full:
        args.n, args.dim = 60_502, 512
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")

    emb, labels = sop_like(args.n, args.dim, args.seed)
    num_classes = len(np.unique(labels))
    nn_mib = args.n * args.n * 4 / 2**20
    print(
        f"N={args.n} dim={args.dim} classes={num_classes} (2-12 images each) nmi={args.nmi} "
        f"threads={os.cpu_count()}  | an N x N float32 matrix would be {nn_mib:,.0f} MiB"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "emb.npz")
        np.savez(data, emb=emb, labels=labels)
        for method in methods:
            cmd = [sys.executable, __file__, "--worker", method, "--data", data] + (
                [] if args.nmi else ["--no-nmi"]
            )
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"{method} failed (exit {proc.returncode})")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    keys = [
        k
        for k in ("R@1", "R@2", "R@4", "R@8", "MAP@R", "R-Precision", "NMI")
        if any(k in r["values"] for r in results.values())
    ]
    header = f"{'method':<12}{'time s':>9}{'peak MiB':>10}  " + "".join(f"{k:>12}" for k in keys)
    print(header)
    for method, r in results.items():
        vals = "".join(f"{r['values'][k]:>12.6f}" if k in r["values"] else f"{'-':>12}" for k in keys)
        print(f"{method:<12}{r['seconds']:>9.2f}{r['peak_extra_mib']:>10.1f}  {vals}")
    if "pml" in results:
        pml = results["pml"]
        for method in (m for m in results if m != "pml"):
            r = results[method]
            diffs = [
                abs(r["values"][k] - pml["values"][k])
                for k in ("R@1", "MAP@R", "R-Precision")
                if k in pml["values"]
            ]
            print(
                f"{method} / pml: time x{r['seconds'] / pml['seconds']:.2f}, "
                f"peak memory x{r['peak_extra_mib'] / max(pml['peak_extra_mib'], 1e-9):.2f}, "
                f"max |diff| R@1/MAP@R/RP = {max(diffs):.1e}"
            )
    for method, r in results.items():
        print(f"{method} peak memory = {r['peak_extra_mib'] / nn_mib:.3f} x (N x N float32)")
    if args.json:
        args.json.write_text(
            json.dumps({"n": args.n, "dim": args.dim, "nmi": args.nmi, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
