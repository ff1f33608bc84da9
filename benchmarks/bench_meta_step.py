"""Cost of one ``threshold_policy=meta`` / ``hypergrad`` training step relative to one static step.

Same model, batches, miner and loss for every variant, all measured in the same run:
  Embedder("resnet18", dim=128, freeze_bn=True) at 64x64, train batch 32 (8 classes x 4),
  meta batch 10 (5 x 2), AT-ASMS miner + SoftContrastive loss, Adam on the model.
A *step* is what ``DMLModule.training_step`` does: ``policy.step`` (embed, mine, loss; plus the
virtual step and the lambda update for ``meta``), ``zero_grad``, ``backward`` of the returned loss,
``optimizer.step``, then ``policy.after_optimizer_step`` (where hypergrad advances its tangent Z).
Variants: static | meta exact (``exact_impl="identity"``, the default) | meta exact-double_backward
| meta jvp (``jvp_reuse_forward=True``, the default) | meta jvp-separate (``jvp_reuse_forward=False``)
| meta jvp every=4 (``every=4``: timed over whole periods of 4 steps, per step) | meta head-only
(``meta_params=head``, where the policy offers it; else the row says "not available")
| hypergrad ``meta_params`` all | head x ``meta_objective`` loss | nca (``HypergradThreshold``, its other
defaults; the sweep's arm is head-nca) | hypergrad all-nca every=4 (the amortisation, where the policy
offers ``every``; it does not yet: "not available").
Issue 23 (same rounds): ``target_rate`` (the statistics-driven lambda, ``TargetRateThreshold``: a static
step plus one sort of the B x B similarities; its bound is the static step's passes) and ``many_heads K=6
split=head`` (``ManyHeadsThreshold`` over the study's 6-point grid on ``ManyHeads``: the resnet18 trunk once,
6 linear heads); in the tiny-model table ``mlp target_rate``, ``mlp many_heads K=6`` (split=none: 6
whole MLPs, the cached-feature mode's grid in one run) and ``mlp many_heads K=6 split=head`` (the hidden
layers shared), each many-heads row also printed as a fraction of the 6 static steps it replaces.
Tiny model (the cached-feature mode: ``backbone=mlp`` on 512-d vectors, ``MLPEmbedder(in_dim=512)`` with
conf/backbone/mlp.yaml's hidden [128, 128], dim 32; same batch sizes, miner, loss and optimiser): mlp
static | mlp meta jvp | mlp hypergrad all-nca | head-nca, in the same rounds, printed in a table of their
own against ``mlp static`` (no bounds there: a step of this model is mostly per-call overhead, not passes).
Units (rows ``unit: ...``, timed in the same rounds): a forward of the train batch, its forward +
backward, the meta batch's forward + backward, its forward alone (no graph), a graph-free
forward-mode pass (primal + tangent) over the train batch, one optimiser step, and one forward-over-reverse
pass over the train batch (the gradient and one Hessian-vector product, ``gradient_and_tangent``).

Lower bounds. Each variant needs a fixed set of passes; with the units' measured times the cheapest
step that set allows is (F = forward, B = backward of the train batch, M = meta forward + backward,
Mf = meta forward, T = forward-mode pass with its primal, O = optimiser step, H = forward-over-reverse
pass (primal forward and backward with their tangents), static = F + B + O):
  jvp (reuse)     static + M + (T - F)      the tangent rides on the real forward
  jvp-separate    static + M + T
  exact identity  static + M + 2 B          virtual-step gradient and cotangent backward
  head-only       static + Mf               the tangent and meta backward stop at the head (~0)
  every=k         ((k - 1) static + jvp) / k
  hypergrad all   static + M + H + O         the meta gradient at theta_t, one HVP of the train loss (the
                                             policy returns the loss the step back-propagates, so the HVP
                                             pass's own gradient is computed again), the tangent's
                                             optimiser rule (Adam: Z and both moments' tangents, >= O)
  hypergrad head  static + Mf + F            as head-only, plus the HVP pass's backbone forward (it does
                                             not reuse the real forward's features; reusing them: static + Mf)
  hypergrad every=k  hypergrad all - (k - 1) M / k   only the meta gradient can be held: Z follows every
                                             real update, so the HVP and the tangent update stay per step
The ``targets`` table prints measured / static, the bound as a multiple of the static step's own
passes (``F + B + O``, both from the unit rows, so load changes between them cancel) and
measured / bound (1.00 = no time left beyond the passes the algorithm needs).

Time: wall clock, the variants run round-robin (one repeat of each per round, after warm-up rounds)
so that load from other processes hits them alike; median (and min) over the repeats.
Memory (CPU): the step's *peak resident-set growth*: ``VmHWM - VmRSS`` read from /proc/self/status,
with the high-water mark reset just before the step (``echo 5 > /proc/self/clear_refs``). glibc keeps
freed heap pages resident, which would hide the step's allocations, so ``malloc_trim(0)`` hands them
back to the kernel first (they must then be faulted in again, and count, when the step reuses them).
tracemalloc is not used: it does not see torch's allocations. On CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated``
minus the allocated memory before the step. Hypergrad's tangent store (Z and the optimiser moments'
tangents, C x N each) lives across steps, so it is not in a step's growth: printed on its own line.
Targets (issue 15): jvp <= 1.5x, exact <= 2.0x, head-only <= 1.15x the static step's time; where the
lower bound lies above a target, the target is out of reach for that algorithm on this set-up.
Threads: one intra-op thread by default (``--threads 0``: torch's default). On a small shared machine,
spinning OpenMP threads that lose their core to another process slow every parallel region down by
up to 10x, which makes multi-threaded timings meaningless there; the ratios are what matters.

Run: .venv/bin/python benchmarks/bench_meta_step.py [--repeats 5] [--warmup 2] [--threads 1] [--device cpu]
     [--quick] [--every 4]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import dataclasses
import gc
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddtas_lightning.losses import SoftContrastiveLoss  # noqa: E402
from ddtas_lightning.miners.at_asms import AdaptiveToleranceASMS  # noqa: E402
from ddtas_lightning.models import Embedder  # noqa: E402
from ddtas_lightning.models.many_heads import ManyHeads  # noqa: E402
from ddtas_lightning.models.mlp import MLPEmbedder  # noqa: E402
from ddtas_lightning.policies import (  # noqa: E402
    HypergradThreshold,
    ManyHeadsThreshold,
    MetaThreshold,
    StaticThreshold,
    StepBatch,
    TargetRateThreshold,
)
from ddtas_lightning.policies.virtual_step import (  # noqa: E402
    FunctionalModel,
    gradient_and_tangent,
    loss_and_gradient,
)

TARGETS = {"meta jvp": 1.5, "meta exact": 2.0, "meta head-only": 1.15}
# Issue 23: the study's lambda grid, one head each (threshold_policy=many_heads)
HEAD_GRID = (-0.2, 0.0, 0.2, 0.4, 0.6, 0.8)
HYPERGRAD_OBJECTIVES = ("loss", "nca")
NOT_AVAILABLE = "not available"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return glibc's free heap pages to the kernel (no-op elsewhere)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_step(policy, model, loss_fn, miner, batch, opt):
    def step():
        out = policy.step(model, loss_fn, miner, batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        policy.after_optimizer_step(opt)  # as DMLModule.training_step (hypergrad's tangent update)
        return out

    return step


def make_period_step(policy, model, loss_fn, miner, batch, opt, every: int):
    """``every`` consecutive steps of a policy with ``every`` (global_step 0..every-1: one meta step
    and every-1 held ones); :func:`per_step` turns its times into the mean cost per step."""
    batch = dataclasses.replace(batch)
    step = make_step(policy, model, loss_fn, miner, batch, opt)

    def period():
        for t in range(every):
            batch.global_step = t
            out = step()
        return out

    return period


def per_step(times: dict, name: str, every: int) -> None:
    times[name] = [t / every for t in times[name]]


def unit_steps(model, images, meta_images, opt) -> dict:
    """The passes the steps are made of (see the module docstring), each as a callable."""
    fm = FunctionalModel(model)
    direction = {n: torch.randn_like(p) * 1e-3 for n, p in fm.params.items()}

    def backward(emb):
        (emb @ emb.T).sum().backward()

    def forward():
        return fm(images)

    def forward_backward():
        opt.zero_grad(set_to_none=True)
        backward(fm(images))

    def meta_forward_backward():
        return loss_and_gradient(lambda p: (fm(meta_images, p, update_buffers=False) ** 2).sum(), fm.params)

    @torch.no_grad()
    def meta_forward():
        return fm(meta_images, update_buffers=False)

    def tangent_pass():
        return fm.forward_with_tangent(images, direction, update_buffers=False, keep_graph=False)

    def optimizer_step():
        for p in fm.params.values():  # a gradient of the right shape (values do not matter)
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        opt.step()

    return {"unit: F train fwd": forward, "unit: F+B train": forward_backward,
            "unit: M meta fwd+bwd": meta_forward_backward, "unit: Mf meta fwd": meta_forward,
            "unit: T tangent pass": tangent_pass, "unit: O optimizer": optimizer_step}


def hvp_unit(model, images) -> dict:
    """``unit: H hvp pass``: one forward-over-reverse pass over the train batch, the gradient and its
    derivative along a random direction of every parameter (the Hessian-vector product hypergrad takes
    per step), through the policies' own ``gradient_and_tangent``."""
    fm = FunctionalModel(model)
    direction = {n: torch.randn_like(p) * 1e-3 for n, p in fm.params.items()}
    control = torch.ones((), device=images.device)

    def loss_of(params, c):
        emb = fm(images, params, update_buffers=False)
        return c * (emb @ emb.T).sum()

    def hvp():
        return gradient_and_tangent(loss_of, fm.params, control, direction, torch.ones_like(control))

    return {"unit: H hvp pass": hvp}


def unit_medians(times: dict) -> dict[str, float]:
    """The units' median times by their letter (F, F+B, M, Mf, T, O, H)."""
    return {name.split()[1]: statistics.median(t) for name, t in times.items() if name.startswith("unit: ")}


def lower_bounds(u: dict[str, float], every: int) -> dict[str, float]:
    """The cheapest step each variant's passes allow, as a multiple of the static step's passes
    (``F + B + O``), both sums from the same unit medians (module docstring)."""
    static = u["F+B"] + u["O"]
    b = u["F+B"] - u["F"]
    jvp = static + u["M"] + (u["T"] - u["F"])
    bounds = {
        "meta jvp": jvp,
        "meta jvp-separate": static + u["M"] + u["T"],
        "meta exact": static + u["M"] + 2 * b,
        "meta head-only": static + u["Mf"],
        f"meta jvp every={every}": ((every - 1) * static + jvp) / every,
        "target_rate": static,  # a static step's passes (+ one sort of the B x B similarities)
    }
    if "H" in u:  # hypergrad (see the module docstring)
        full = static + u["M"] + u["H"] + u["O"]
        for objective in HYPERGRAD_OBJECTIVES:
            bounds[f"hypergrad all-{objective}"] = full
            bounds[f"hypergrad head-{objective}"] = static + u["Mf"] + u["F"]
        bounds[f"hypergrad all-nca every={every}"] = full - (every - 1) * u["M"] / every
    return {name: t / static for name, t in bounds.items()}


def print_targets(times: dict, bounds: dict[str, float], targets: dict[str, float], width: int = 22) -> list[str]:
    """Per variant with a target or a bound: measured / static, target, lower bound (x static),
    measured / bound and a verdict. Returns the missed targets (as text)."""
    static = statistics.median(times["static"])
    print(f"{'variant':<{width}}{'x static':>10}{'target':>8}{'bound x':>9}{'x bound':>9}  verdict")
    missed = []
    for name in [*targets, *(n for n in bounds if n not in targets and n in times)]:
        target, bound = targets.get(name), bounds.get(name)
        tgt = f"{target:8.2f}" if target else f"{'-':>8}"
        bnd = f"{bound:9.2f}" if bound else f"{'n/a':>9}"
        if not times.get(name):
            print(f"{name:<{width}}{'n/a':>10}{tgt}{bnd}{'n/a':>9}  {NOT_AVAILABLE}")
            continue
        ratio = statistics.median(times[name]) / static
        close = f"{ratio / bound:9.2f}" if bound else f"{'n/a':>9}"
        if target is None:
            verdict = ""
        elif ratio <= target:
            verdict = "met"
        elif bound and bound > target:
            verdict = f"missed; out of reach for this algorithm: its passes alone cost {bound:.2f}x"
            missed.append(f"{name}: {ratio:.2f}x > {target}x")
        else:
            verdict = "MISSED"
            missed.append(f"{name}: {ratio:.2f}x > {target}x")
        print(f"{name:<{width}}{ratio:10.2f}{tgt}{bnd}{close}  {verdict}")
    return missed


def optional_policy(cls, **kwargs):
    """``cls(**kwargs)``, or None where the policy has no such option (its row says "not available")."""
    if not kwargs.keys() <= inspect.signature(cls.__init__).parameters.keys():
        return None
    return cls(**kwargs)


def hypergrad_policies(objectives=HYPERGRAD_OBJECTIVES, params=("all", "head"), prefix="") -> dict:
    """``{prefix}hypergrad {params}-{objective}``: one ``HypergradThreshold`` per combination."""
    return {f"{prefix}hypergrad {which}-{objective}": HypergradThreshold(meta_params=which, meta_objective=objective)
            for which in params for objective in objectives}


def tangent_state_mib(policy) -> float:
    """Hypergrad's tangent store kept between steps (Z and its optimiser-moment tangents), MiB."""
    return sum(b.numel() * b.element_size() for b in (policy.tangent, policy.opt_tangent, policy.opt_tangent_sq)) / 2**20


def peak_memory_mib(step, device: torch.device) -> float | None:
    """Peak memory growth of one call of ``step`` (MiB), see the module docstring."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _trim_heap()
    base = _status_kib("VmRSS")
    if base is None or not _reset_peak_rss():
        return None
    step()
    peak = _status_kib("VmHWM")
    return None if peak is None else max(peak - base, 0) / 1024


def measure_steps(steps: dict, device: torch.device, warmup: int, repeats: int, memory_repeats: int):
    """Interleaved timing of every step (so load changes hit all variants alike), then peak memory.

    Returns ``(times, memory, outputs)``: seconds per timed call, MiB per memory call (none where the
    platform cannot measure it) and the step's return values of the timed calls, each by name."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    outputs: dict[str, list] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            out = step()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
                outputs[name].append(out)
    memory: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(memory_repeats):
        for name, step in steps.items():
            m = peak_memory_mib(step, device)
            if m is not None:
                memory[name].append(m)
    return times, memory, outputs


def print_ratio_table(times: dict, memory: dict, width: int = 22, baseline: str = "static",
                      names=None) -> dict[str, float]:
    """One row per variant (``names``, default all): median / min time and peak memory, each also as a
    ratio to ``baseline`` (measured in the same run). Returns the median-time ratio of every variant."""
    base_med, base_min = statistics.median(times[baseline]), min(times[baseline])
    base_mem = statistics.median(memory[baseline]) if memory[baseline] else None
    print(f"{'variant':<{width}}{'median s':>10}{'min s':>9}{'x static':>10}{'x (min)':>9}{'peak MiB':>10}{'x static':>10}")
    ratios = {}
    for name in times if names is None else names:
        if not times[name]:
            print(f"{name:<{width}}{NOT_AVAILABLE:>10}")
            continue
        med, mn = statistics.median(times[name]), min(times[name])
        mem = statistics.median(memory[name]) if memory[name] else None
        mem_s = f"{mem:10.1f}" if mem is not None else f"{'n/a':>10}"
        mem_r = f"{mem / base_mem:10.2f}" if mem is not None and base_mem else f"{'n/a':>10}"
        print(f"{name:<{width}}{med:10.3f}{mn:9.3f}{med / base_med:10.2f}{mn / base_min:9.2f}{mem_s}{mem_r}")
        ratios[name] = med / base_med
    return ratios

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every", type=int, default=4, help="k of the every=k variant")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up, 1 memory repeat, no extra "
                        "variants (meta exact-double_bw, jvp-separate, hypergrad *-loss)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a time target is missed")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.memory_repeats = 3, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = Embedder("resnet18", dim=128, freeze_bn=True).to(device).train()
    g = torch.Generator().manual_seed(0)
    batch = StepBatch(
        images=torch.randn(32, 3, 64, 64, generator=g).to(device),
        labels=torch.arange(8).repeat_interleave(4).to(device),
        meta_images=torch.randn(10, 3, 64, 64, generator=g).to(device),
        meta_labels=torch.arange(5).repeat_interleave(2).to(device),
    )
    loss_fn, miner = SoftContrastiveLoss(), AdaptiveToleranceASMS()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=5e-4)
    policies = {
        "static": StaticThreshold(),
        "meta exact": MetaThreshold(mode="exact"),
        "meta exact-double_bw": MetaThreshold(mode="exact", exact_impl="double_backward"),
        "meta jvp": MetaThreshold(mode="jvp", jvp_reuse_forward=True),
        "meta jvp-separate": MetaThreshold(mode="jvp", jvp_reuse_forward=False),
        "meta head-only": optional_policy(MetaThreshold, mode="jvp", meta_params="head"),
        **hypergrad_policies(),
        "target_rate": TargetRateThreshold(),
    }
    if args.quick:
        for name in ("meta exact-double_bw", "meta jvp-separate", "hypergrad all-loss", "hypergrad head-loss"):
            del policies[name]
    steps = {name: make_step(p.to(device), model, loss_fn, miner, batch, opt)
             for name, p in policies.items() if p is not None}
    every = {f"meta jvp every={args.every}": MetaThreshold(mode="jvp", every=args.every),
             f"hypergrad all-nca every={args.every}": optional_policy(
                 HypergradThreshold, meta_params="all", meta_objective="nca", every=args.every)}
    for name, p in every.items():
        if p is not None:
            steps[name] = make_period_step(p.to(device), model, loss_fn, miner, batch, opt, args.every)
    # the grid in one run with a shared trunk (split=head: resnet18 trunk, K linear heads, trunk gets their mean)
    heads_name = f"many_heads K={len(HEAD_GRID)} split=head"
    heads_model = ManyHeads(copy.deepcopy(model), len(HEAD_GRID), split="head").to(device).train()
    heads_opt = torch.optim.Adam(heads_model.parameters(), lr=1e-5, weight_decay=5e-4)
    steps[heads_name] = make_step(ManyHeadsThreshold(HEAD_GRID, split="head").to(device), heads_model, loss_fn,
                                  miner, batch, heads_opt)
    steps.update(unit_steps(model, batch.images, batch.meta_images, opt))
    steps.update(hvp_unit(model, batch.images))

    # the cached-feature mode's tiny model: backbone=mlp on 512-d vectors (conf/backbone/mlp.yaml's layers)
    torch.manual_seed(0)
    mlp = MLPEmbedder(in_dim=512).to(device).train()
    mlp_batch = StepBatch(
        images=torch.randn(32, 512, generator=g).to(device), labels=batch.labels,
        meta_images=torch.randn(10, 512, generator=g).to(device), meta_labels=batch.meta_labels,
    )
    mlp_opt = torch.optim.Adam(mlp.parameters(), lr=1e-5, weight_decay=5e-4)
    mlp_policies = {"mlp static": StaticThreshold(), "mlp meta jvp": MetaThreshold(mode="jvp"),
                    **hypergrad_policies(objectives=("nca",), prefix="mlp "), "mlp target_rate": TargetRateThreshold()}
    steps.update({name: make_step(p.to(device), mlp, loss_fn, miner, mlp_batch, mlp_opt)
                  for name, p in mlp_policies.items()})
    # the grid in one run, cached-feature mode (split=none: K whole MLPs, one vmap call), vs one static step
    mlp_heads_name = f"mlp many_heads K={len(HEAD_GRID)}"
    mlp_heads = ManyHeads(copy.deepcopy(mlp), len(HEAD_GRID)).to(device).train()
    mlp_heads_opt = torch.optim.Adam(mlp_heads.parameters(), lr=1e-5, weight_decay=5e-4)
    steps[mlp_heads_name] = make_step(ManyHeadsThreshold(HEAD_GRID).to(device), mlp_heads, loss_fn, miner,
                                      mlp_batch, mlp_heads_opt)
    # ... with a shared MLP trunk (split=head: the hidden layers once, 6 linear heads)
    mlp_shared_name = f"mlp many_heads K={len(HEAD_GRID)} split=head"
    mlp_shared = ManyHeads(copy.deepcopy(mlp), len(HEAD_GRID), split="head").to(device).train()
    mlp_shared_opt = torch.optim.Adam(mlp_shared.parameters(), lr=1e-5, weight_decay=5e-4)
    steps[mlp_shared_name] = make_step(ManyHeadsThreshold(HEAD_GRID, split="head").to(device), mlp_shared, loss_fn,
                                       miner, mlp_batch, mlp_shared_opt)
    mlp_names = [*mlp_policies, mlp_heads_name, mlp_shared_name]

    times, memory, _ = measure_steps(steps, device, args.warmup, args.repeats, args.memory_repeats)
    for name, p in every.items():
        if p is None:
            times[name], memory[name] = [], []
        else:
            per_step(times, name, args.every)
    for name, p in policies.items():
        if p is None:
            times[name], memory[name] = [], []

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={torch.get_num_threads()} (cpus {os.cpu_count()}, load {load:.1f}) torch={torch.__version__} "
          f"resnet18 dim=128 64x64, batch 32 (8x4), meta 10 (5x2), repeats={args.repeats} warmup={args.warmup}")
    mem_kind = "CUDA max_memory_allocated growth" if device.type == "cuda" else "peak RSS growth (VmHWM - VmRSS)"
    print(f"memory: {mem_kind}, median of {args.memory_repeats}")
    width = 27
    print_ratio_table(times, memory, width=width, names=[n for n in times if n not in mlp_names])
    print("hypergrad tangent store kept between steps (not in the peak growth): " + ", ".join(
        f"{name.split()[-1]} {tangent_state_mib(p):.1f} MiB" for name, p in {**policies, **mlp_policies}.items()
        if isinstance(p, HypergradThreshold) and name.startswith("hypergrad")))
    print("\ncached-feature mode: MLPEmbedder(in_dim=512, hidden=[128, 128], dim=32) on 512-d vectors, vs mlp static:")
    print_ratio_table(times, memory, width=width, baseline="mlp static", names=mlp_names)
    k = len(HEAD_GRID)
    for name, base in ((mlp_heads_name, "mlp static"), (mlp_shared_name, "mlp static"), (heads_name, "static")):
        ratio = statistics.median(times[name]) / statistics.median(times[base])
        print(f"the grid in one run: {name} = {ratio:.2f}x one {base} step = {ratio / k:.2f} of the {k} static "
              f"steps it replaces")
    print("mlp hypergrad tangent store: " + ", ".join(
        f"{name.split()[-1]} {tangent_state_mib(p):.2f} MiB" for name, p in mlp_policies.items()
        if isinstance(p, HypergradThreshold)))
    print("\ntargets (median time; bound = the variant's passes from the unit rows, see --help):")
    bounds = lower_bounds(unit_medians(times), args.every)
    missed = print_targets(times, bounds, TARGETS, width=width)
    print("targets: " + ("all met" if not missed else "missed " + "; ".join(missed)))
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
