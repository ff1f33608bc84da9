"""Cost of one ``threshold_policy=mmsi`` (and ``pair_weight``) training step relative to one static step.

Same model, batches, miner and loss for every variant, all measured in the same run:
  Embedder("resnet18", dim=128, freeze_bn=True) at 64x64, train batch 32 (8 classes x 4),
  MS miner (epsilon 0.05) + MS loss (the official MMSI CUB pairing), Adam on the model.
  mmsi: meta batch 10 (10 classes x 1) against a full memory (100 classes x 20 entries, so its size
  stays constant from step to step); pair_weight: meta batch 10 (5 x 2) against itself.
A *step* is what ``DMLModule.training_step`` does: ``policy.step`` (embed, mine, loss; plus the
memory update, the virtual step and the weights for the meta policies), ``zero_grad``, ``backward``
of the returned loss, ``optimizer.step``.
Variants: static | mmsi exact (double backward) | mmsi jvp | pair_weight exact | pair_weight jvp,
plus the unit passes of ``bench_meta_step.py`` (same rounds) and, from them, each jvp variant's
lower bound (F, B, M, T, O as there; static = F + B + O):
  mmsi jvp         static + M + T           its memory needs the real forward before the meta loss,
                                            so the forward-mode pass is a separate one (primal again)
  pair_weight jvp  static + M + (T - F)     the forward-mode pass is the real forward
Target (issue 15): mmsi jvp <= 1.6x the static step's time.

Time and memory are measured exactly as in ``bench_meta_step.py`` (whose helpers this reuses):
round-robin repeats after warm-up rounds, median (and min); memory = peak RSS growth of one step on
CPU (``VmHWM - VmRSS`` after ``malloc_trim``), ``torch.cuda.max_memory_allocated`` growth on CUDA.
Threads: one intra-op thread by default (``--threads 0``: torch's default); the ratios are what matters.

Run: .venv/bin/python benchmarks/bench_mmsi_step.py [--repeats 5] [--warmup 2] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_meta_step import (  # noqa: E402
    make_step,
    measure_steps,
    print_ratio_table,
    print_targets,
    unit_medians,
    unit_steps,
)

from ddtas_lightning.losses import MultiSimilarityLoss  # noqa: E402
from ddtas_lightning.miners.ms import MultiSimilarityMiner  # noqa: E402
from ddtas_lightning.models import Embedder  # noqa: E402
from ddtas_lightning.policies import MMSI, MetaPairWeights, StaticThreshold, StepBatch  # noqa: E402

TARGETS = {"mmsi jvp": 1.6}


def full_memory(policy: MMSI, dim: int, device: torch.device, classes: int = 100, per_class: int = 20) -> None:
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(classes * per_class, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat(per_class)
    policy.memory.enqueue(emb.to(device), labels.to(device), torch.arange(len(labels), device=device) + 10_000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up, 1 memory repeat, no exact rows")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.memory_repeats = 3, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    dim = 128
    model = Embedder("resnet18", dim=dim, freeze_bn=True).to(device).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 64, 64, generator=g).to(device)
    labels = torch.arange(8).repeat_interleave(4).to(device)
    meta_images = torch.randn(10, 3, 64, 64, generator=g).to(device)
    mmsi_batch = StepBatch(images, labels, indices=torch.arange(32, device=device), meta_images=meta_images,
                           meta_labels=torch.arange(10, device=device) * 7,
                           meta_indices=torch.arange(10, device=device) + 100)
    pair_batch = StepBatch(images, labels, meta_images=meta_images,
                           meta_labels=torch.arange(5).repeat_interleave(2).to(device))
    loss_fn, miner = MultiSimilarityLoss(), MultiSimilarityMiner(epsilon=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=5e-4)
    policies = {
        "static": (StaticThreshold(), mmsi_batch),
        "mmsi exact": (MMSI(mode="exact", memory_size_per_class=20, warmup_classes=98), mmsi_batch),
        "mmsi jvp": (MMSI(mode="jvp", memory_size_per_class=20, warmup_classes=98), mmsi_batch),
        "pair_weight exact": (MetaPairWeights(mode="exact"), pair_batch),
        "pair_weight jvp": (MetaPairWeights(mode="jvp"), pair_batch),
    }
    if args.quick:
        for name in ("mmsi exact", "pair_weight exact"):
            del policies[name]
    steps = {}
    for name, (policy, batch) in policies.items():
        policy.to(device)
        if isinstance(policy, MMSI):
            full_memory(policy, dim, device)
        steps[name] = make_step(policy, model, loss_fn, miner, batch, opt)
    steps.update(unit_steps(model, images, meta_images, opt))

    times, memory, outputs = measure_steps(steps, device, args.warmup, args.repeats, args.memory_repeats)
    skipped = {name: sum(int(out.skip_update) for out in outs) for name, outs in outputs.items()
               if name in policies}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={torch.get_num_threads()} (cpus {os.cpu_count()}, load {load:.1f}) "
          f"torch={torch.__version__} resnet18 dim={dim} 64x64, batch 32 (8x4), MS miner + MS loss, "
          f"mmsi: meta 10x1 vs memory 100x20; pair_weight: meta 5x2; repeats={args.repeats} warmup={args.warmup}")
    mem_kind = "CUDA max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth (VmHWM - VmRSS)"
    print(f"memory: {mem_kind}, median of {args.memory_repeats}")
    print_ratio_table(times, memory, width=20)
    u = unit_medians(times)
    static = u["F+B"] + u["O"]
    bounds = {"mmsi jvp": (static + u["M"] + u["T"]) / static,
              "pair_weight jvp": (static + u["M"] + u["T"] - u["F"]) / static}
    print("\ntargets (median time; bound = the variant's passes from the unit rows, see --help):")
    missed = print_targets(times, bounds, TARGETS, width=20)
    print("targets: " + ("all met" if not missed else "missed " + "; ".join(missed)))
    if any(skipped[n] for n in skipped if n != "static"):  # a skipped step would not measure the meta work
        print("WARNING: skipped meta steps (no positive weight): " + str(skipped))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
