"""GPU check (``make gpu-check``): one table that proves the CUDA path, in a few minutes on one GPU.

Rows (model: timm ``resnet50`` -> 512-d embedding at 227 px, batch 64 = 16 classes x 4, AT-ASMS miner +
SoftContrastive loss, Adam; meta batch 10 = 5 x 2):
  static: framework   images/s of ``DMLModule.training_step`` inside a Lightning ``Trainer`` (32-true),
                      batches from a DataLoader (pinned on CUDA), step time = time between two batch ends
  static: bare loop   the same model, batches, miner, loss and optimiser in a plain PyTorch loop over the same
                      DataLoader; target: framework >= 95% of the bare loop
  meta / mmsi ratios  ``bench_meta_step.measure_steps`` on the device: meta jvp, meta exact, meta jvp every=4,
                      mmsi jvp against the static step (same rounds), with each step's peak memory
  precision           a short ``Trainer`` run of ``threshold_policy=meta`` (jvp, lr 1e-2) per precision
                      (bf16-mixed, 16-mixed, bf16-true): lambda must move and stay float32, the loss finite
  channels_last /     static bare-loop step with the model in channels_last, with ``torch.compile`` of the
  torch.compile       backbone (compiled outside any torch.func transform: the meta policies keep the eager
                      model) and both; speed-up over eager; compile time shown separately
  faiss / k-means     SOP scale (60,502 x 512 unit vectors): exact k-NN (k=100, self-excluded) with
                      ``metrics.knn`` faiss on the GPU vs the CPU path, and ``kmeans_assign`` (11,316
                      clusters, 2 iterations) GPU vs CPU (faiss-gpu needed: ``pip install -e .[gpu]``)
  peak memory         ``torch.cuda.max_memory_allocated`` over the whole check
Without a CUDA device every row says "no CUDA device: skipped" and the script exits 0 (CI keeps it
alive). ``--device cpu --tiny`` runs every check that CPU can run with tiny sizes (what the test does).

Run: .venv/bin/python benchmarks/gpu_check.py [--steps 20] [--no-compile] [--device cuda|cpu] [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))



def load_project() -> None:
    """The project's and the benchmarks' imports, as module globals (a run that only prints the
    skipped rows needs none of them, which keeps it fast in CI)."""
    global make_period_step, make_step, measure_steps, per_step, SoftContrastiveLoss, AdaptiveToleranceASMS
    global Embedder, MMSI, MetaThreshold, StaticThreshold, StepBatch
    from bench_meta_step import make_period_step, make_step, measure_steps, per_step

    from ddtas_lightning.losses import SoftContrastiveLoss
    from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS
    from ddtas_lightning.models import Embedder
    from ddtas_lightning.policies import MMSI, MetaThreshold, StaticThreshold, StepBatch

SKIPPED = "no CUDA device: skipped"
ROWS = [  # every row the table has, in order (a CPU run prints each as skipped)
    "device", "static: bare loop", "static: framework", "meta jvp", "meta exact", "meta jvp every=4", "mmsi jvp",
    "precision bf16-mixed", "precision 16-mixed", "precision bf16-true", "channels_last", "torch.compile",
    "channels_last + compile", "faiss k-NN", "k-means", "peak GPU memory",
]


class Table:
    """Rows of (check, result, target, verdict), printed as they come and once more at the end."""

    def __init__(self, progress: bool = True) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.progress = progress

    def add(self, check: str, result: str, target: str = "", verdict: str = "") -> None:
        self.rows.append((check, result, target, verdict))
        if self.progress:
            print(f"  {check}: {result} {target} {verdict}".rstrip(), flush=True)

    def print(self) -> None:
        w = [max(len(r[i]) for r in [("check", "result", "target", "verdict"), *self.rows]) for i in range(4)]
        print()
        for row in [("check", "result", "target", "verdict"), tuple("-" * n for n in w), *self.rows]:
            print("  ".join(c.ljust(n) for c, n in zip(row, w)).rstrip())


# ---- set-up --------------------------------------------------------------------------------------------
class Setup:
    def __init__(self, device: torch.device, tiny: bool) -> None:
        self.device, self.tiny = device, tiny
        self.model_name, self.dim, self.size = ("resnet18", 32, 32) if tiny else ("resnet50", 512, 227)
        self.P, self.K = (4, 2) if tiny else (16, 4)
        self.meta_P, self.meta_K = (2, 2) if tiny else (5, 2)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(self.P * self.K, 3, self.size, self.size, generator=g)
        self.labels = torch.arange(self.P).repeat_interleave(self.K)
        self.meta_images = torch.randn(self.meta_P * self.meta_K, 3, self.size, self.size, generator=g)
        self.meta_labels = torch.arange(self.meta_P).repeat_interleave(self.meta_K) + 1000

    def model(self) -> Embedder:
        torch.manual_seed(0)
        return Embedder(self.model_name, dim=self.dim, freeze_bn=True).to(self.device).train()

    def optimizer(self):
        return functools.partial(torch.optim.Adam, lr=1e-5, weight_decay=5e-4)

    def loader(self, steps: int, meta: bool = False):
        """``steps`` batches (images, labels, index), the meta batch appended as the module expects."""
        images, labels = self.images, self.labels
        if meta:
            images, labels = torch.cat([images, self.meta_images]), torch.cat([labels, self.meta_labels])
        batch = (images, labels, torch.arange(len(labels)))

        class Repeat(torch.utils.data.Dataset):
            def __len__(self):
                return steps

            def __getitem__(self, i):
                return batch

        return torch.utils.data.DataLoader(Repeat(), batch_size=None, pin_memory=self.device.type == "cuda")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _median_rate(times: list[float], n_images: int) -> float:
    return n_images / statistics.median(times)


# ---- static step: framework vs bare loop ---------------------------------------------------------------
def bare_loop(setup: Setup, steps: int, warmup: int, model=None, prepare=None) -> list[float]:
    """Seconds per static step of a plain loop (the framework's step without the framework)."""
    model = setup.model() if model is None else model
    opt = setup.optimizer()([p for p in model.parameters() if p.requires_grad])
    loss_fn, miner = SoftContrastiveLoss(), AdaptiveToleranceASMS()
    times, last = [], None
    for i, (images, labels, _) in enumerate(setup.loader(steps + warmup)):
        images = images.to(setup.device, non_blocking=True)
        labels = labels.to(setup.device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        emb = model(images)
        sim = emb @ emb.T
        loss = loss_fn(sim, miner(sim, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        setup.sync()
        now = time.perf_counter()
        if last is not None and i >= warmup:
            times.append(now - last)
        last = now
    return times


def _trainer(setup: Setup, steps: int, precision: str, callbacks: list):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="gpu" if setup.device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )


def _module(setup: Setup, policy, meta: bool):
    from ddtas_lightning.module import DMLModule

    return DMLModule(setup.model(), SoftContrastiveLoss(), AdaptiveToleranceASMS(), policy, setup.optimizer(),
                     meta_batch_size=len(setup.meta_labels) if meta else 0)


def framework_steps(setup: Setup, steps: int, warmup: int, precision: str = "32-true", policy=None):
    """Seconds per step of ``Trainer.fit`` (time between two batch ends), and the fitted module."""
    import lightning.pytorch as pl

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times, self.last, self.seen = [], None, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            setup.sync()
            now = time.perf_counter()
            if self.last is not None and self.seen >= warmup:
                self.times.append(now - self.last)
            self.last, self.seen = now, self.seen + 1

    meta = policy is not None and policy.needs_meta_batch
    module = _module(setup, StaticThreshold() if policy is None else policy, meta)
    timer = Timer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(setup, steps + warmup, precision, [timer]).fit(module, train_dataloaders=setup.loader(
            steps + warmup, meta=meta))
    return timer.times, module


def check_static(setup: Setup, table: Table, steps: int, warmup: int) -> float:
    n = len(setup.labels)
    bare = _median_rate(bare_loop(setup, steps, warmup), n)
    frame = _median_rate(framework_steps(setup, steps, warmup)[0], n)
    table.add("static: bare loop", f"{bare:.1f} img/s")
    ratio = frame / bare
    table.add("static: framework", f"{frame:.1f} img/s = {100 * ratio:.1f}% of bare", ">= 95%",
              "met" if ratio >= 0.95 else "MISSED")
    return bare


# ---- meta / mmsi step ratios ---------------------------------------------------------------------------
def check_meta_ratios(setup: Setup, table: Table, repeats: int, warmup: int) -> None:
    dev = setup.device
    model = setup.model()
    opt = setup.optimizer()(model.parameters())
    loss_fn, miner = SoftContrastiveLoss(), AdaptiveToleranceASMS()
    batch = StepBatch(setup.images.to(dev), setup.labels.to(dev), meta_images=setup.meta_images.to(dev),
                      meta_labels=setup.meta_labels.to(dev), indices=torch.arange(len(setup.labels), device=dev),
                      meta_indices=torch.arange(len(setup.meta_labels), device=dev) + 10_000)
    mmsi = MMSI(mode="jvp", memory_size_per_class=4, warmup_classes=2, meta_K=None).to(dev)
    g = torch.Generator().manual_seed(1)
    classes = setup.meta_P + setup.P
    emb = torch.nn.functional.normalize(torch.randn(classes * 4, setup.dim, generator=g), dim=1)
    mem_labels = torch.cat([torch.arange(setup.P), setup.meta_labels.unique()]).repeat(4)
    mmsi.memory.enqueue(emb.to(dev), mem_labels.to(dev), torch.arange(len(mem_labels), device=dev) + 20_000)
    steps = {
        "static": make_step(StaticThreshold(), model, loss_fn, miner, batch, opt),
        "meta jvp": make_step(MetaThreshold(mode="jvp").to(dev), model, loss_fn, miner, batch, opt),
        "meta exact": make_step(MetaThreshold(mode="exact").to(dev), model, loss_fn, miner, batch, opt),
        "meta jvp every=4": make_period_step(MetaThreshold(mode="jvp", every=4).to(dev), model, loss_fn, miner,
                                             batch, opt, 4),
        "mmsi jvp": make_step(mmsi, model, loss_fn, miner, batch, opt),
    }
    times, memory, outputs = measure_steps(steps, dev, warmup, repeats, 1)
    per_step(times, "meta jvp every=4", 4)
    static = statistics.median(times["static"])
    targets = {"meta jvp": 1.5, "meta exact": 2.0, "mmsi jvp": 1.6}
    for name in steps:
        if name == "static":
            continue
        ratio = statistics.median(times[name]) / static
        mem = f", peak {memory[name][0]:.0f} MiB" if memory[name] else ""
        target = targets.get(name)
        skipped = sum(bool(getattr(o, "skip_update", False)) for o in outputs[name])
        note = f", {skipped} of {len(outputs[name])} updates skipped (no positive weight)" if skipped else ""
        verdict = "" if target is None else ("met" if ratio <= target else "missed")
        table.add(name, f"{ratio:.2f}x static ({1e3 * statistics.median(times[name]):.1f} ms{mem}{note})",
                  f"<= {target}x" if target else "", verdict)


# ---- precision: lambda still learning -----------------------------------------------------------------
def check_precision(setup: Setup, table: Table, precision: str, steps: int) -> None:
    if setup.device.type == "cpu" and precision == "16-mixed":
        table.add(f"precision {precision}", "not on CPU (Lightning's 16-mixed needs CUDA): skipped")
        return
    policy = MetaThreshold(mode="jvp", init=0.5, lr=1e-2)
    try:
        _, module = framework_steps(setup, steps, 0, precision=precision, policy=policy)
    except Exception as e:  # noqa: BLE001 - a row of the table, not a crash of the check
        table.add(f"precision {precision}", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", "",
                  "FAILED")
        return
    lam = module.policy.lam
    moved = abs(float(lam) - 0.5)
    ok = lam.dtype == torch.float32 and moved > 0 and all(torch.isfinite(p).all() for p in module.parameters())
    table.add(f"precision {precision}", f"lambda 0.5 -> {float(lam):.4f} after {steps} steps ({lam.dtype})",
              "moves, float32", "met" if ok else "MISSED")


# ---- channels_last / torch.compile -------------------------------------------------------------------
def check_layout_and_compile(setup: Setup, table: Table, steps: int, warmup: int, compile_: bool,
                             eager_rate: float) -> None:
    n = len(setup.labels)

    def run(name, channels_last: bool, compiled: bool):
        model = setup.model()
        prepare = None
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            prepare = functools.partial(torch.Tensor.contiguous, memory_format=torch.channels_last)
        compile_s = 0.0
        if compiled:  # the backbone only, outside any torch.func transform
            model.backbone = torch.compile(model.backbone)
            t0 = time.perf_counter()
            bare_loop(setup, 1, 1, model=model, prepare=prepare)  # compiles forward and backward
            compile_s = time.perf_counter() - t0
        rate = _median_rate(bare_loop(setup, steps, warmup, model=model, prepare=prepare), n)
        extra = f", compile {compile_s:.0f} s" if compiled else ""
        table.add(name, f"{rate:.1f} img/s = {rate / eager_rate:.2f}x eager{extra}")

    run("channels_last", True, False)
    if not compile_:
        table.add("torch.compile", "--no-compile: skipped")
        table.add("channels_last + compile", "--no-compile: skipped")
        return
    run("torch.compile", False, True)
    run("channels_last + compile", True, True)


# ---- faiss-gpu k-NN and k-means --------------------------------------------------------------------------
def check_faiss(setup: Setup, table: Table) -> None:
    from ddtas_lightning.metrics import knn
    from ddtas_lightning.metrics.clustering import kmeans_assign
    from ddtas_lightning.metrics.neighbors import quiet_faiss

    n, d, k, clusters = (2000, 64, 10, 200) if setup.tiny else (60_502, 512, 100, 11_316)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    ids = torch.arange(n)
    faiss = quiet_faiss()
    gpu = setup.device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0

    def timed(fn):
        setup.sync()
        t0 = time.perf_counter()
        out = fn()
        setup.sync()
        return time.perf_counter() - t0, out

    cpu_s, (_, cpu_idx) = timed(lambda: knn(x, x, k, backend="faiss", query_ids=ids, reference_ids=ids))
    if gpu:
        xg, idg = x.to(setup.device), ids.to(setup.device)
        gpu_s, (_, gpu_idx) = timed(lambda: knn(xg, xg, k, backend="faiss", query_ids=idg, reference_ids=idg))
        same = torch.equal(gpu_idx.cpu(), cpu_idx)
        table.add("faiss k-NN", f"{n}x{d}, k={k}: GPU {gpu_s:.2f} s vs CPU {cpu_s:.2f} s = {cpu_s / gpu_s:.1f}x",
                  "same neighbours", "met" if same else "MISSED")
    else:
        why = "faiss without GPU support (pip install -e .[gpu])" if setup.device.type == "cuda" else "CPU only"
        table.add("faiss k-NN", f"{n}x{d}, k={k}: CPU {cpu_s:.2f} s; GPU: {why}")
    cpu_s, _ = timed(lambda: kmeans_assign(x, clusters, niter=2))
    if gpu:
        gpu_s, _ = timed(lambda: kmeans_assign(x.to(setup.device), clusters, niter=2))
        table.add("k-means", f"{clusters} clusters, 2 iter: GPU {gpu_s:.2f} s vs CPU {cpu_s:.2f} s = "
                  f"{cpu_s / gpu_s:.1f}x")
    else:
        table.add("k-means", f"{clusters} clusters, 2 iter: CPU {cpu_s:.2f} s; GPU: not available")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, batch and SOP stand-in (CPU test)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    table = Table(progress=args.device is not None or torch.cuda.is_available())
    if args.device is None and not torch.cuda.is_available():
        for row in ROWS:
            table.add(row, SKIPPED)
        table.print()
        return 0
    load_project()
    device = torch.device(args.device or "cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)
    setup = Setup(device, args.tiny)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    table.add("device", f"{name}; torch {torch.__version__}{cuda}; {setup.model_name} {setup.size}px, "
              f"batch {len(setup.labels)} ({setup.P}x{setup.K}), meta {len(setup.meta_labels)}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eager = check_static(setup, table, args.steps, args.warmup)
    check_meta_ratios(setup, table, repeats=max(3, args.steps // 4), warmup=2)
    for precision in ("bf16-mixed", "16-mixed", "bf16-true"):
        check_precision(setup, table, precision, steps=max(5, args.steps // 2))
    check_layout_and_compile(setup, table, args.steps, args.warmup, args.compile and device.type == "cuda", eager)
    check_faiss(setup, table)
    if device.type == "cuda":
        table.add("peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    else:
        table.add("peak GPU memory", SKIPPED)
    total = time.perf_counter() - t_start
    table.add("total time", f"{total:.0f} s", "< 300 s", "met" if total < 300 else "MISSED")
    table.print()
    return 1 if any(row[3] == "FAILED" for row in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
