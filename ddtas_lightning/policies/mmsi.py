"""MMSI: Meta-Mining Strategy with Semi-global Information (Jiang, Liu, Dai, Hu, Huang, Yao, Xie,
Shao, IEEE TNNLS 35(4), 2024; spec ``docs/papers/mmsi.md`` §1, §2).

Per-pair weights learned by one-step look-ahead meta-learning (the machinery of
:mod:`ddtas_lightning.policies.pair_weights`), with the meta batch (P_m classes x 1 image, drawn
from the TRAIN split) scored against a *semi-global memory*: a per-class FIFO of detached train
embeddings (:class:`ddtas_lightning.memory.SemiGlobalMemory`). Per step:

1. embed the train batch at theta (the real forward) and enqueue the detached global embeddings
   into the memory *before* it is used (spec §2: the current batch is already in it);
2. warm-up: until the memory holds ``warmup_classes`` classes there is no update at all (official
   behaviour): a zero loss with a graph, ``skip_update=True``, ``meta/warmup`` = 1;
3. mine, weights ``w = 0`` on the mined pairs, the weighted train loss, the virtual step;
4. the meta loss (official G-loss): meta embeddings at theta' against the memory entries
   (constants): positives = same label but another dataset index (the image itself is excluded by
   index, not by value: the official ``s < 1`` test, spec §6.5), negatives = other labels, no
   mining; anchors lacking a positive or a negative contribute nothing; when no anchor is left the
   step is skipped (official ``if L_G == 0: continue``);
5. ``w~ = relu(-dL_G/dw)``, max-normalised, and the real update with ``w~``.

The memory is a submodule, so it is part of the state_dict (checkpoints, resume).
"""

from __future__ import annotations

from torch import Tensor

from ddtas_lightning.memory import SemiGlobalMemory
from ddtas_lightning.policies.base import StepBatch
from ddtas_lightning.policies.pair_weights import MetaPairWeights, MetaTarget, meta_selection


class MMSI(MetaPairWeights):
    """``threshold_policy=mmsi``. Arguments as :class:`MetaPairWeights`, plus

    memory_size_per_class: entries kept per class in the memory (official ``d_size``: 100 CUB MS,
        1 Cars contrastive, 1000 SOP).
    warmup_classes: no update until the memory holds this many classes (official: 98 CUB / Cars,
        1000 SOP).
    meta_K: images per class of the meta batch (official ``val_num_instances`` = 1; the memory
        provides the positives).
    Logs (besides the base class's): ``meta/memory_size`` (entries), ``meta/memory_classes``.
    """

    def __init__(
        self,
        mode: str = "exact",
        inner_lr: float = 1e-5,
        normalization: str = "per_sign",
        meta_K: int | None = 1,
        memory_size_per_class: int = 100,
        warmup_classes: int = 16,
        static_steps: int = 0,
    ) -> None:
        super().__init__(mode=mode, inner_lr=inner_lr, normalization=normalization, meta_K=meta_K,
                         static_steps=static_steps)
        self.memory = SemiGlobalMemory(memory_size_per_class, warmup_classes)

    def observe(self, embeddings: Tensor, batch: StepBatch) -> None:
        # `embeddings` / `batch.labels` / `batch.indices` are the global batch: every DDP rank
        # performs the same enqueue and holds the same memory.
        self.memory.enqueue(embeddings, batch.labels, batch.indices)

    def warming_up(self) -> bool:
        return not self.memory.ready

    def meta_target(self, batch: StepBatch) -> MetaTarget:
        emb, labels, indices = self.memory.entries()
        selection = meta_selection(batch.meta_labels.to(labels.device), labels,
                                   None if batch.meta_indices is None else batch.meta_indices.to(labels.device),
                                   indices)
        return MetaTarget(selection, reference=emb)

    def extra_logs(self) -> dict[str, Tensor]:
        device = self.memory.labels.device
        return {
            "meta/memory_size": self.memory.labels.new_tensor(len(self.memory), device=device),
            "meta/memory_classes": self.memory.labels.new_tensor(self.memory.num_classes, device=device),
        }


__all__ = ["MMSI"]
