"""Any pytorch-metric-learning loss inside the framework (``loss=pml loss.name=ProxyAnchorLoss``), and our
losses from plain PML code (:func:`as_pml_loss`).

:class:`PMLLoss` builds ``pytorch_metric_learning.losses.<name>(**kwargs)`` and calls it on the global
batch's embeddings with the miner's pairs as PML's ``indices_tuple`` (``None`` when the miner selected
every pair, e.g. ``miner=none``, so proxy and classification losses see unweighted samples).

- Losses with parameters (ProxyAnchor's / ProxyNCA's proxies, ArcFace's / CosFace's ``W``, ...) are
  submodules of the LightningModule: checkpointed, restored on resume, and optimised in their own
  parameter group with ``optimizer.loss_lr`` (``+optimizer.loss_lr=...``; default: ``optimizer.lr``).
  Under DDP every rank computes the loss of the same gathered global batch, and Lightning's DDP
  all-reduces the loss parameters' gradients with the model's, so they stay identical on every rank.
- ``num_classes`` / ``embedding_size`` are passed when the PML class takes them (``embedding_size``
  defaults to ``backbone.dim``); training labels (raw class ids, e.g. CUB's 1..100) are mapped to
  slots ``0..num_classes-1`` in order of first appearance, a buffer saved with the checkpoint.
- ``memory_size > 0`` wraps the loss in PML's ``CrossBatchMemory`` (XBM, Wang et al. CVPR 2020): the
  batch is compared with the last ``memory_size`` embeddings (the pair losses PML lists in
  ``CrossBatchMemory.supported_losses()``); the queue is checkpointed (buffers + extra state). With a
  memory, the miner's batch pairs are not used (the loss mines against the memory itself).
- Threshold policies: a PML loss takes neither our threshold lambda nor per-pair weights, so only
  ``threshold_policy=static`` drives it; ``meta`` / ``mmsi`` / ``pair_weight`` (whose virtual step
  would learn lambda or weights the loss ignores) are refused with one error. For the record, their
  virtual step is taken over the *model's* parameters only: a loss's own parameters are held fixed in it.

pytorch-metric-learning is an optional dependency (the ``pml`` extra: ``pip install -e '.[pml]'``);
without it ``loss=pml`` / ``miner=pml`` fail with one clear error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.losses.base import MetricLoss
from ddtas_lightning.miners.selection import PairSelection, label_masks


def import_pml(what: str):
    """``pytorch_metric_learning`` or one clear error naming the option that needs it."""
    try:
        import pytorch_metric_learning
    except ImportError:
        raise ConfigError(f"{what} needs pytorch-metric-learning: pip install -e '.[pml]' "
                          "(or pip install pytorch-metric-learning)") from None
    return pytorch_metric_learning


def pml_class(module, name: str, key: str, base: type) -> type:
    cls = getattr(module, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, base)) or cls is base:
        names = sorted(n for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base)
                       and c is not base and not n.startswith("Base"))
        raise ConfigError(f"{key}={name!r} is not a pytorch-metric-learning class; one of: {', '.join(names)}")
    return cls


def _plain(kwargs: Mapping | None) -> dict:
    """The PML class's keyword arguments as a plain dict (the configs pass them with ``_convert_: all``)."""
    return {} if kwargs is None else {str(k): v for k, v in dict(kwargs).items()}


class PMLLoss(MetricLoss):
    """``pytorch_metric_learning.losses.<name>(**kwargs)`` as a :class:`MetricLoss` (see the module doc).

    forward(sim, selection, threshold=None, weights=None, *, embeddings, labels): ``embeddings`` (B, d)
    and ``labels`` (B,) of the global batch (the static policy passes them, since the loss declares
    ``needs_embeddings``); ``sim`` and ``threshold`` are not used.
    """

    needs_embeddings = True

    def __init__(self, name: str = "ContrastiveLoss", kwargs: Mapping | None = None, num_classes: int | None = None,
                 embedding_size: int | None = None, memory_size: int = 0) -> None:
        super().__init__(threshold=0.0)
        pml = import_pml("loss=pml")
        import pytorch_metric_learning.losses as losses

        cls = pml_class(losses, name, "loss.name", losses.BaseMetricLossFunction)
        kwargs = _plain(kwargs)
        params = inspect.signature(cls.__init__).parameters
        for key, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
            if key in params and key not in kwargs:
                if value is None:
                    raise ConfigError(f"loss.{key}: {name} needs it (e.g. loss.num_classes=100 for the "
                                      "100 CUB training classes; embedding_size defaults to backbone.dim)")
                kwargs[key] = int(value)
        self.name, self.pml_version = name, pml.__version__
        self.num_classes = kwargs.get("num_classes")
        try:
            self.loss = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"loss.kwargs for {name}: {e}") from None
        # training labels -> proxy / class slots 0..num_classes-1 (raw ids need not be 0-based)
        if self.num_classes is not None:
            self.register_buffer("class_ids", torch.full((int(self.num_classes),), -1, dtype=torch.long))
        self.memory_size = int(memory_size)
        if self.memory_size > 0:
            self.loss = _checkpointed_memory(self.loss, name, embedding_size, self.memory_size)

    def slots(self, labels: Tensor) -> Tensor:
        """Labels mapped to ``0..num_classes-1`` (new classes take the next free slots, in increasing id order)."""
        if self.num_classes is None:
            return labels
        ids = self.class_ids
        known = ids[ids >= 0]
        new = torch.unique(labels[~torch.isin(labels, known)])
        if len(new):
            start = len(known)
            if start + len(new) > len(ids):
                raise ValueError(f"loss.num_classes={len(ids)} but the training labels have more classes "
                                 f"(at least {start + len(new)}); set loss.num_classes to the number of train classes")
            ids[start : start + len(new)] = new.to(ids.device)
            known = ids[ids >= 0]
        order = torch.argsort(known)
        pos = torch.searchsorted(known[order], labels)
        return order[pos]

    def forward(self, sim: Tensor, selection: PairSelection, threshold=None, weights: Tensor | None = None, *,
                embeddings: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        if embeddings is None or labels is None:
            raise ValueError(f"loss=pml ({self.name}) needs the batch embeddings and labels "
                             "(threshold_policy=static passes them)")
        if weights is not None:
            raise ValueError(f"loss=pml ({self.name}) does not take per-pair weights")
        labels = labels.to(embeddings.device)
        slots = self.slots(labels)
        emb = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings
        if self.memory_size > 0:
            return self.loss(emb, slots)
        return self.loss(emb, slots, indices_tuple=_indices_or_none(selection, labels))


def _indices_or_none(selection: PairSelection, labels: Tensor):
    """PML's ``indices_tuple`` of the selection, ``None`` when it holds every pair (no mining)."""
    if selection.triplets is None:
        pos, neg = label_masks(labels)
        if torch.equal(selection.pos_mask, pos) and torch.equal(selection.neg_mask, neg):
            return None
    return selection.to_indices_tuple()


class _MemoryState(nn.Module):
    """Holds PML ``CrossBatchMemory``'s queue position (Python ints there) as checkpointable extra state."""

    def __init__(self, memory) -> None:
        super().__init__()
        object.__setattr__(self, "memory", memory)  # a plain reference, not a submodule (no cycle)

    def get_extra_state(self):
        return {"queue_idx": int(self.memory.queue_idx), "has_been_filled": bool(self.memory.has_been_filled)}

    def set_extra_state(self, state) -> None:
        self.memory.queue_idx = int(state["queue_idx"])
        self.memory.has_been_filled = bool(state["has_been_filled"])


def _checkpointed_memory(loss: nn.Module, name: str, embedding_size: int | None, memory_size: int) -> nn.Module:
    from pytorch_metric_learning.losses import CrossBatchMemory

    if name not in CrossBatchMemory.supported_losses():
        raise ConfigError(f"loss.memory_size={memory_size}: PML's CrossBatchMemory does not support {name}; "
                          f"one of {', '.join(CrossBatchMemory.supported_losses())}")
    if embedding_size is None:
        raise ConfigError("loss.memory_size > 0 needs loss.embedding_size (default: backbone.dim)")
    memory = CrossBatchMemory(loss, int(embedding_size), memory_size=memory_size)
    for buf in ("embedding_memory", "label_memory"):  # plain attributes in PML: make them buffers
        value = getattr(memory, buf)
        delattr(memory, buf)
        memory.register_buffer(buf, value)
    memory.queue_state = _MemoryState(memory)
    return memory


def check_policy_support(loss: nn.Module, miner: nn.Module, policy: nn.Module) -> None:
    """A loss / miner that ``needs_embeddings`` (PML's) runs only under a policy that ``passes_embeddings``
    (``threshold_policy=static``; see the module doc)."""
    for what, obj in (("loss=pml", loss), ("miner=pml", miner)):
        if getattr(obj, "needs_embeddings", False) and not getattr(policy, "passes_embeddings", False):
            raise ConfigError(
                f"{what} runs under threshold_policy=static only: {type(policy).__name__} learns the loss "
                "threshold lambda or per-pair weights in a virtual step, and a PML loss / miner takes neither "
                "(nor would its own parameters take part: the virtual step is over the model's parameters)")


# ---- the other way: our losses in plain PML code ------------------------------------------------------
def as_pml_loss(loss: MetricLoss) -> Callable[..., Tensor]:
    """``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` with PML's calling
    convention (``indices_tuple`` from any PML miner, ``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets)."""

    def call(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, **kwargs) -> Tensor:
        return loss.from_embeddings(embeddings, labels, indices_tuple, ref_emb=ref_emb, ref_labels=ref_labels,
                                    **kwargs)

    return call
