"""What a run records about itself for the reports (metrics.json), as two Lightning callbacks.

* :class:`ComputeMeter`: compute that does not depend on what else runs on the machine. CPU seconds of
  the training process (``time.process_time``: every thread of the process) plus its reaped child
  processes (DataLoader workers, ``RUSAGE_CHILDREN``), summed over DDP ranks; on CUDA the GPU time of
  the training steps (CUDA events around every step, read once per epoch so the hot path never waits);
  and a count of the passes through the model, at the embedder's output, per stage (train / validate /
  test): forward calls and their images, forward-mode (jvp) calls, backward passes and their images
  (a many-heads model's (K, B, d) output, ``threshold_policy=many_heads``, counts as K passes of B images).
  A backward pass is counted when a gradient reaches the embeddings (one per ``backward`` or
  ``autograd.grad`` through the model); the second-order part of a literal double backward is not
  counted separately. The totals travel in checkpoints (callback state), so a resumed run reports
  the compute up to its checkpoint plus its own (the work between that checkpoint and a crash is
  lost, and not counted); under DDP, a resumed run's earlier seconds are rank 0's times the ranks.
* :class:`ValidationHistory`: every validation's ``val/*`` metrics with its step, so the report can
  read the validation metrics *of the selected checkpoint* (the first best ``val/R@1``, the rule of
  Lightning's ``ModelCheckpoint(mode="max")``), not only the last ones.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.autograd import forward_ad

PASS_KEYS = ("forward", "forward_images", "jvp", "backward", "backward_images")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    return time.process_time() + children_cpu_s()


def _stage(trainer: pl.Trainer | None) -> str:
    stage = getattr(getattr(trainer, "state", None), "stage", None)
    return "train" if stage is None else str(stage.value if hasattr(stage, "value") else stage)


def _inside_func_jvp() -> bool:
    """Whether this forward runs under ``torch.func.jvp`` (hypergrad's forward-over-reverse HVP): its
    dual tensors are functorch wrappers, invisible to ``forward_ad.unpack_dual``."""
    from torch._C._functorch import TransformType, get_interpreter_stack

    return any(i.key() == TransformType.Jvp for i in (get_interpreter_stack() or ()))


class ComputeMeter(pl.Callback):
    """CPU / GPU seconds and model passes of ``fit`` (see the module docstring); :meth:`summary`."""

    def __init__(self) -> None:
        self.passes: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(PASS_KEYS, 0))
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.gpu_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._handle = None
        self._trainer: pl.Trainer | None = None
        self._world = 1
        self._base = {"cpu_s": 0.0, "gpu_s": 0.0, "wall_s": 0.0}  # restored from a checkpoint
        self._cpu0 = self._wall0 = None

    def state_dict(self) -> dict:
        now = self._base.copy()
        if self._cpu0 is not None:
            now["cpu_s"] += process_cpu_s() - self._cpu0
            now["wall_s"] += time.perf_counter() - self._wall0
        now["gpu_s"] += self.gpu_s
        return {**now, "passes": {k: dict(v) for k, v in self.passes.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._base = {k: float(state.get(k, 0.0)) for k in ("cpu_s", "gpu_s", "wall_s")}
        for stage, counts in state.get("passes", {}).items():
            self.passes[stage].update({k: int(v) for k, v in counts.items()})

    # ---- pass counting: a forward hook on the embedder --------------------------------------------
    def _count(self, module, inputs, output) -> None:
        if not isinstance(output, Tensor):
            return
        counts = self.passes[_stage(self._trainer)]
        n = int(output.shape[0]) if output.dim() else 1
        calls = 1
        if getattr(module, "stacked_heads", False) and output.dim() == 3:  # ManyHeads: (K, B, d) = K passes of B
            calls, n = int(output.shape[0]), int(output.shape[1])
        counts["forward"] += calls
        counts["forward_images"] += calls * n
        if forward_ad.unpack_dual(output).tangent is not None or _inside_func_jvp():
            counts["jvp"] += calls
        if output.requires_grad and torch.is_grad_enabled():
            def on_backward(grad: Tensor, counts=counts, n=n, calls=calls) -> None:
                counts["backward"] += calls
                counts["backward_images"] += calls * n

            output.register_hook(on_backward)

    def attach(self, model: torch.nn.Module) -> None:
        if self._handle is None:
            self._handle = model.register_forward_hook(self._count)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.attach(getattr(pl_module, "model", pl_module))

    # ---- time ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cpu0, self._wall0 = process_cpu_s(), time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._events and self._events[-1][1] is None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1] = (self._events[-1][0], end)

    def _drain_gpu_events(self) -> None:
        done = [(s, e) for s, e in self._events if e is not None]
        if done:
            done[-1][1].synchronize()  # once per epoch, never per step
            self.gpu_s += sum(s.elapsed_time(e) for s, e in done) / 1000.0
        self._events = [(s, e) for s, e in self._events if e is None]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain_gpu_events()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain_gpu_events()
        self.wall_s = self._base["wall_s"] + time.perf_counter() - self._wall0
        mine = torch.tensor([process_cpu_s() - self._cpu0, self.gpu_s], dtype=torch.float64)
        self._world = int(trainer.world_size)
        if self._world > 1:  # every rank's own seconds, summed (the passes are the same on every rank)
            mine = trainer.strategy.reduce(mine.to(pl_module.device), reduce_op="sum").cpu()
        self.cpu_s = float(mine[0]) + self._base["cpu_s"] * self._world
        self.gpu_s = float(mine[1]) + self._base["gpu_s"] * self._world

    def summary(self) -> dict:
        """``compute`` of metrics.json (fit = training with its validations)."""
        return {
            "fit_cpu_s": self.cpu_s,
            "fit_gpu_s": self.gpu_s if self.gpu_s > 0 else None,
            "fit_wall_s": self.wall_s,
            "world_size": self._world,
            "passes": {stage: dict(counts) for stage, counts in self.passes.items()},
        }


class ValidationHistory(pl.Callback):
    """``val/*`` of every validation (not the sanity check), with its global step."""

    def __init__(self, monitor: str = "val/R@1") -> None:
        self.monitor = monitor
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self.history.append({"step": int(trainer.global_step), **values})

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))

    def best(self) -> dict[str, float]:
        """The first validation with the highest monitored value (ModelCheckpoint's choice)."""
        best: dict[str, float] = {}
        for entry in self.history:
            if self.monitor in entry and (not best or entry[self.monitor] > best[self.monitor]):
                best = entry
        return best


class TrainLossTrace(pl.Callback):
    """The training loss at the first step, over the last epoch (mean of its steps) and at the last step:
    ``metrics.json``'s ``train_loss``, so a run says whether it fitted its batches (``debug=overfit``: the
    same batches every epoch, the last epoch's mean should approach 0)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self._epoch: list[float] = []
        self._last_epoch: list[float] = []

    @staticmethod
    def _loss(outputs) -> float | None:
        value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        return float(value) if isinstance(value, Tensor) and value.numel() == 1 else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = self._loss(outputs)
        if loss is None:
            return
        self.first = loss if self.first is None else self.first
        self.last = loss
        self._epoch.append(loss)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch:
            self._last_epoch = list(self._epoch)

    def state_dict(self) -> dict:
        return {"first": self.first}

    def load_state_dict(self, state: dict) -> None:
        self.first = state.get("first")

    def summary(self) -> dict[str, float | None]:
        last_epoch = self._last_epoch or self._epoch
        mean = sum(last_epoch) / len(last_epoch) if last_epoch else None
        return {"first_step": self.first, "last_epoch_mean": mean, "last_step": self.last}
