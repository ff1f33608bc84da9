"""MMSI's semi-global dictionary (spec ``docs/papers/mmsi.md`` §2): a per-class FIFO of detached
training embeddings, used as a constant "gallery" by the meta loss.

Layout. One flat store, kept sorted by class (ascending label) and, within a class, by age
(oldest first): ``embeddings`` (N x D), ``labels`` (N,), ``indices`` (N,) (dataset index of the
image each entry came from, ``-1`` if unknown). :meth:`SemiGlobalMemory.entries` therefore returns
the buffers themselves (no copy). Each :meth:`SemiGlobalMemory.enqueue` appends the new rows, stably
re-sorts by label (old rows precede new ones of the same class, so age order is kept) and keeps the
newest ``size_per_class`` rows of every class: a handful of vectorised ops, no Python loop, one copy
of the store per step (CUB with 100 x 100 entries of 512 floats: 20 MB).

Why flat rather than a dense (classes x size_per_class x D) ring: the number of classes and D are
only known once data arrives, and a dense ring is allocated for its full size while the store may
stay sparse (SOP: 11,318 classes x 1,000 slots x 512 floats = 23 GB, of which a 6,000-iteration run
fills under 1 GB). The price is that the buffers change size as the store fills; loading a
checkpoint resizes them first (:meth:`_load_from_state_dict`), so a resumed run gets the memory back.

Device and dtype. The store lives where its buffers live (it moves with the module, e.g. onto the
GPU with the LightningModule). While empty it adopts the device and dtype of the first rows it gets;
afterwards new rows are converted to the store's.

DDP. Callers pass the *global* batch (all ranks' rows, gathered and detached, with the global labels
and indices), so every rank performs the same enqueues and holds the same memory: the meta loss, and
therefore the per-pair weights, agree across ranks without communication.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import as_int

_BUFFERS = ("embeddings", "labels", "indices")


class SemiGlobalMemory(nn.Module):
    """Per-class FIFO of detached embeddings (MMSI's semi-global dictionary).

    size_per_class: entries kept per class (the newest; official ``d_size``).
    warmup_classes: :attr:`ready` only once this many distinct classes are stored (MMSI does no
        update at all before that: 98 for CUB / Cars, 1000 for SOP in the official code).
    """

    # Buffers whose shape changes during training (restored by _load_from_state_dict): a checkpoint
    # check comparing state_dict shapes with a freshly built module must not compare these.
    variable_shape_state = frozenset(_BUFFERS)

    def __init__(self, size_per_class: int = 100, warmup_classes: int = 0) -> None:
        super().__init__()
        self.size_per_class = as_int("threshold_policy.memory_size_per_class", size_per_class, minimum=1)
        self.warmup_classes = as_int("threshold_policy.warmup_classes", warmup_classes, minimum=0)
        self.register_buffer("embeddings", torch.zeros(0, 0))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.long))

    # ---- queries ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        """Distinct classes stored (the store is sorted by label, so consecutive runs = classes)."""
        if len(self) == 0:
            return 0
        return int((self.labels[1:] != self.labels[:-1]).sum()) + 1

    @property
    def ready(self) -> bool:
        """At least ``warmup_classes`` distinct classes are stored (and at least one entry)."""
        return len(self) > 0 and self.num_classes >= self.warmup_classes

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(embeddings M x D, labels M, indices M)``: classes in ascending label order, each class
        oldest first. The buffers themselves (no copy): treat them as read-only."""
        return self.embeddings, self.labels, self.indices

    # ---- update ----------------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor, indices: Tensor | None = None) -> None:
        """Append rows (in batch order: later rows are newer) and keep the newest
        ``size_per_class`` entries of each class. ``indices``: dataset indices (``None``: -1).

        Under DDP pass the global batch (gathered embeddings, global labels / indices), see the
        module docstring. Embeddings are stored detached.
        """
        if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"enqueue needs embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if indices is None:
            indices = torch.full_like(labels, -1)
        elif indices.shape != labels.shape:
            raise ValueError(f"indices must have the shape of labels {tuple(labels.shape)}, got {tuple(indices.shape)}")
        if len(self) == 0:  # adopt the first rows' width, device and dtype
            self.embeddings = embeddings.new_zeros(0, embeddings.shape[1])
            self.labels = self.labels.to(embeddings.device)
            self.indices = self.indices.to(embeddings.device)
        elif embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"enqueue: embeddings of width {embeddings.shape[1]} into a memory of width {self.embeddings.shape[1]}"
            )
        device = self.embeddings.device
        emb = torch.cat([self.embeddings, embeddings.detach().to(device, self.embeddings.dtype)])
        lab = torch.cat([self.labels, labels.to(device, torch.long)])
        idx = torch.cat([self.indices, indices.to(device, torch.long)])
        # Stable sort by label: the existing rows (already in (label, age) order) stay before the new
        # rows of their class, and new rows keep batch order: the result is in (label, age) order.
        order = torch.sort(lab, stable=True).indices
        sorted_labels = lab[order]
        _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        class_end = torch.repeat_interleave(torch.cumsum(counts, 0), counts)  # one past each row's class
        newest = class_end - torch.arange(len(order), device=device) <= self.size_per_class
        keep = order[newest]
        self.embeddings, self.labels, self.indices = emb[keep], lab[keep], idx[keep]

    @torch.no_grad()
    def clear(self) -> None:
        self.embeddings = self.embeddings.new_zeros(0, self.embeddings.shape[1])
        self.labels = self.labels[:0].clone()
        self.indices = self.indices[:0].clone()

    # ---- checkpoints -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The store's size changes as it fills: give each buffer the saved shape and dtype (the store
        # keeps the dtype of the data put in, see the module docstring), on the current device,
        # before the default loader copies the values in.
        for name in _BUFFERS:
            saved = state_dict.get(prefix + name)
            current = self._buffers[name]
            if isinstance(saved, Tensor) and (saved.shape != current.shape or saved.dtype != current.dtype):
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"size_per_class={self.size_per_class}, warmup_classes={self.warmup_classes}, "
                f"entries={len(self)}, classes={self.num_classes}")


__all__ = ["SemiGlobalMemory"]
