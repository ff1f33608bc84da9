"""Evaluation cost at SOP scale: our RetrievalMetrics (torch and faiss) vs pytorch-metric-learning's AccuracyCalculator.

Synthetic embeddings with SOP's test-set structure (60,502 x 512, classes of 2-12 images, unit vectors around class
centres). Every measurement runs in its own fresh subprocess on the same embeddings (written once to a temporary
.npz), with 2 threads for torch, faiss and BLAS on both sides. Reported per run: wall time of the evaluation call,
the process' peak RSS (``ru_maxrss``: imports, data and evaluation, the number the 4 GB budget is about) and the
extra resident memory the evaluation itself needed (peak-RSS counter reset via ``/proc/self/clear_refs``).

k-NN metrics: ours computes R@1/10/100/1000, MAP@R and R-Precision; PML computes precision_at_1 (= R@1), R-Precision
and MAP@R with ``k="max_bin_count"`` (the neighbours its metrics need; its default ``k=None`` is an N x N table).
NMI is timed separately (``nmi-ours`` / ``nmi-pml``): both run ``faiss.Kmeans`` with one cluster per class
(11,316 at SOP scale) on the same embeddings, so it costs the same on both sides and would otherwise dominate.

    python benchmarks/bench_eval.py            # SOP scale, NMI with 2 k-means iterations (a few minutes, 2 cores)
    python benchmarks/bench_eval.py --full     # SOP scale, NMI with PML's 20 iterations (k-means ~10 min/side)
    python benchmarks/bench_eval.py --quick    # N=20,000 x 128-d
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

METHODS = ("ours-torch", "ours-faiss", "pml", "nmi-ours", "nmi-pml")
RECALL_KS = (1, 10, 100, 1000)
THREADS = "2"


SOP_TEST_IMAGES, SOP_TEST_CLASSES = 60_502, 11_316


def sop_like(n: int, dim: int, seed: int, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit class centres plus Gaussian noise; noise grows with dim so that R@1 stays around 0.6-0.8.

    Class sizes lie in 2-12 like SOP's test set; at SOP's size they are ``SOP_TEST_CLASSES`` classes (mean 5.3
    images, skewed towards small classes as in SOP), otherwise ``n / 5.35`` classes.
    """
    rng = np.random.default_rng(seed)
    if num_classes is None:
        num_classes = SOP_TEST_CLASSES if n == SOP_TEST_IMAGES else max(1, round(n / 5.35))
    if not 2 * num_classes <= n <= 12 * num_classes:
        raise ValueError(f"{n} images cannot form {num_classes} classes of 2-12 images")
    sizes = np.clip(2 + rng.geometric(1 / 3.35, num_classes) - 1, 2, 12)
    while (excess := int(sizes.sum()) - n) != 0:  # nudge random classes (within 2-12) to hit n exactly
        pick = rng.integers(0, num_classes, abs(excess))
        np.add.at(sizes, pick, -np.sign(excess))
        sizes = np.clip(sizes, 2, 12)
    labels = np.repeat(np.arange(num_classes), sizes)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
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


def worker(method: str, data: str, nmi_niter: int) -> None:
    import resource

    import faiss
    import torch

    torch.set_num_threads(int(THREADS))
    faiss.omp_set_num_threads(int(THREADS))
    z = np.load(data, allow_pickle=False)
    emb, labels = torch.from_numpy(z["emb"]), torch.from_numpy(z["labels"])
    if method in ("pml", "nmi-pml"):
        import logging

        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import FaissKMeans

        logging.getLogger("PML").setLevel(logging.ERROR)
        include = (
            ("NMI",)
            if method == "nmi-pml"
            else ("precision_at_1", "r_precision", "mean_average_precision_at_r")
        )
        calc = AccuracyCalculator(
            include=include,
            k="max_bin_count",
            device=torch.device("cpu"),
            kmeans_func=FaissKMeans(niter=nmi_niter),  # PML's default is niter=20
        )
        names = {
            "precision_at_1": "R@1",
            "r_precision": "R-Precision",
            "mean_average_precision_at_r": "MAP@R",
        }

        def run() -> dict:
            return {names.get(k, k): float(v) for k, v in calc.get_accuracy(emb, labels).items()}
    elif method == "nmi-ours":
        from ddtas_lightning.metrics.clustering import clustering_nmi

        def run() -> dict:  # PML's k-means seed (faiss' default) and iterations
            return {"NMI": clustering_nmi(emb, labels, seed=1234, niter=nmi_niter)}
    else:
        from ddtas_lightning.metrics import RetrievalMetrics

        def run() -> dict:
            metric = RetrievalMetrics(recall_ks=RECALL_KS, backend=method.split("-")[1], nmi=False)
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
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "hwm_reset": hwm_reset,
                "values": values,
            }
        )
    )


def _run(method: str, data: str, nmi_niter: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, OPENBLAS_NUM_THREADS=THREADS)
    cmd = [sys.executable, __file__, "--worker", method, "--data", data, "--nmi-niter", str(nmi_niter)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"{method} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=60_502)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--full", action="store_true", help="NMI with PML's 20 k-means iterations")
    parser.add_argument("--quick", action="store_true", help="N=20,000, 128-d")
    parser.add_argument(
        "--nmi-niter", type=int, default=2, help="k-means iterations on both sides (default 2)"
    )
    parser.add_argument("--no-nmi", dest="nmi", action="store_false", help="skip k-means/NMI on both sides")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument(
        "--repeat", type=int, default=1, help="interleaved rounds; the fastest time is reported"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.nmi_niter)
        return
    if args.full:
        args.nmi_niter = 20
    if args.quick:
        args.n, args.dim = 20_000, 128
    methods = [m for m in args.methods.split(",") if m and (args.nmi or not m.startswith("nmi"))]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")

    emb, labels = sop_like(args.n, args.dim, args.seed)
    num_classes, sizes = np.unique(labels, return_counts=True)[1].size, np.bincount(labels)
    nn_mib = args.n * args.n * 4 / 2**20
    print(
        f"N={args.n} dim={args.dim} classes={num_classes} ({sizes.min()}-{sizes.max()} images each) threads={THREADS} "
        f"nmi_niter={args.nmi_niter if args.nmi else '-'}  | an N x N float32 matrix would be {nn_mib:,.0f} MiB",
        flush=True,
    )
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "emb.npz")
        np.savez(data, emb=emb, labels=labels)
        for _ in range(args.repeat):  # interleaved, so that machine load hits every method alike
            for method in methods:
                runs[method].append(_run(method, data, args.nmi_niter))
    results = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}

    keys = [
        k
        for k in [f"R@{k}" for k in RECALL_KS] + ["MAP@R", "R-Precision", "NMI"]
        if any(k in r["values"] for r in results.values())
    ]
    header = f"{'method':<12}{'time s':>9}{'peak RSS MiB':>14}{'extra MiB':>11}  " + "".join(
        f"{k:>12}" for k in keys
    )
    print(header)
    for method, r in results.items():
        vals = "".join(f"{r['values'][k]:>12.6f}" if k in r["values"] else f"{'-':>12}" for k in keys)
        print(
            f"{method:<12}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.1f}{r['peak_extra_mib']:>11.1f}  {vals}"
        )

    def ratio(ours: str, pml: str, keys_: tuple[str, ...]) -> None:
        if ours not in results or pml not in results:
            return
        a, b = results[ours], results[pml]
        diffs = [abs(a["values"][k] - b["values"][k]) for k in keys_ if k in a["values"] and k in b["values"]]
        print(
            f"{ours} / {pml}: time x{a['seconds'] / b['seconds']:.2f}, "
            f"peak RSS x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}, "
            f"max |diff| {'/'.join(keys_)} = {max(diffs, default=float('nan')):.1e}"
        )

    for method in ("ours-torch", "ours-faiss"):
        ratio(method, "pml", ("R@1", "MAP@R", "R-Precision"))
    ratio("nmi-ours", "nmi-pml", ("NMI",))
    if "ours-torch" in results and "ours-faiss" in results:
        same = results["ours-torch"]["values"] == results["ours-faiss"]["values"]
        print(f"ours-torch and ours-faiss results identical: {same}")
    for method, r in results.items():
        print(f"{method} peak RSS = {r['peak_rss_mib'] / 1024:.2f} GiB (budget 4 GiB)")
    if args.json:
        payload = {"n": args.n, "dim": args.dim, "nmi_niter": args.nmi_niter, "runs": runs}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
