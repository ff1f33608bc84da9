"""ManyHeads: K embedding heads on one backbone, so one run trains a whole lambda grid (issue 23).

``threshold_policy=many_heads`` wraps the configured backbone in it (see
:class:`~ddtas_lightning.policies.many_heads.ManyHeadsThreshold`); head k then trains at the grid's k-th
lambda. Every head starts from the backbone's own initialisation (the weights a single run of the same
seed starts from), as every point of a grid search does. Two ways to split the model:

* ``split="none"``: nothing is shared; the K heads are K full copies of the backbone (the cached-feature
  mode's MLP: there the real backbone is frozen and cached, so the copies are independent). Each copy is
  an ordinary module with its own parameters and buffers (BatchNorm statistics included), called in turn
  with the same operations and shapes as a single run, so head k follows a single run at lambda_k with the
  same seed and batches bit for bit on the same machine (tested). (Stacking the copies into one batched
  call was tried: on CPU its backward and Adam's update of K-times-larger tensors were 2-2.5x slower than K
  separate modules, and it rounds differently from a single run.)
* ``split="head"``: the backbone up to its embedding head (the Linear ``head`` of
  :class:`~ddtas_lightning.models.Embedder` / :class:`~ddtas_lightning.models.mlp.MLPEmbedder` /
  ``StageTail``) is one shared trunk, run once; the head is replicated K times. ``trunk_grad="mean"``: the
  trunk receives the mean of the K heads' gradients (each head's own parameters get exactly its own loss's
  gradient): the trunk then moves like a single run's backbone (a sum would take K times its step under
  SGD) and no grid point outweighs another. An integer j: the trunk follows head j alone (the others see it
  detached: probes on a trunk shaped by lambda_j). With a frozen trunk the heads are again independent.

``forward(x)`` returns the ``selected`` head's (B, d) embeddings (a buffer, set by the module from the
validation R@1 of every head; checkpoints carry it), so evaluation, ``evaluate.py`` and the galleries see
one model; ``forward(x, heads="all")`` returns all heads' (K, B, d); ``forward(x, heads="active")`` the
(K', B, d) of the heads still in the race (``active``, a buffer: successive halving stops the others, see
:class:`~ddtas_lightning.policies.many_heads.ManyHeadsThreshold`; a stopped head is never called again in
training, so its parameters get no gradient and the optimiser leaves them as they were). :class:`ComputeMeter` counts such an
output as K passes of B images (``stacked_heads``): with ``split="none"`` each head is a whole model; with
``split="head"`` the shared trunk's forward is counted K times too (an upper bound on the passes; the CPU
seconds are measured).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.config.validation import ConfigError, as_int, check_choice

SPLITS = ("none", "head")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (the trunk's mean over heads)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class ManyHeads(nn.Module):
    """K heads on one backbone (module docstring). ``num_heads`` >= 1; ``split`` none | head;
    ``trunk_grad`` "mean" | a head index (split=head only)."""

    stacked_heads = True  # ComputeMeter: a (K, B, d) output is K passes of B images

    def __init__(self, base: nn.Module, num_heads: int, split: str = "none", trunk_grad: str | int = "mean") -> None:
        super().__init__()
        self.num_heads = as_int("threshold_policy.thresholds (its length: the number of heads)", num_heads, 1)
        check_choice("threshold_policy.split", split, SPLITS)
        self.split = split
        if trunk_grad != "mean":
            trunk_grad = as_int("threshold_policy.trunk_grad", trunk_grad, 0)
            if trunk_grad >= self.num_heads:
                raise ConfigError(f"threshold_policy.trunk_grad must be 'mean' or a head index < {self.num_heads}, "
                                  f"got {trunk_grad}")
            if split != "head":
                raise ConfigError("threshold_policy.trunk_grad=<head index> needs split=head (split=none shares "
                                  "no trunk)")
        self.trunk_grad = trunk_grad
        self.register_buffer("selected", torch.zeros((), dtype=torch.long))
        self.register_buffer("active", torch.ones(self.num_heads, dtype=torch.bool))
        if split == "none":
            self.heads = nn.ModuleList(copy.deepcopy(base) for _ in range(self.num_heads))
            return
        head = getattr(base, "head", None)
        if not isinstance(head, nn.Linear) or not hasattr(base, "normalize"):
            raise ConfigError(f"threshold_policy.split=head needs a backbone whose embedding head is a Linear named "
                              f"`head` with a `normalize` flag (Embedder, MLPEmbedder, StageTail); "
                              f"{type(base).__name__} has none: use split=none")
        self.normalize = bool(base.normalize)
        self.relu_output = bool(getattr(base, "relu_output", False))
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in range(self.num_heads))
        base.head = nn.Identity()  # the trunk returns the features the head reads
        base.normalize = False
        if hasattr(base, "relu_output"):
            base.relu_output = False
        self.trunk = base

    def _finish(self, z: Tensor) -> Tensor:
        """split=head: what the backbone does after its head (ReLU output, L2 normalisation)."""
        if self.relu_output:
            z = F.relu(z)
        return F.normalize(z, dim=1) if self.normalize else z

    def active_heads(self) -> list[int]:
        """The indices of the heads still trained (all of them unless successive halving stopped some)."""
        return [k for k in range(self.num_heads) if bool(self.active[k])]

    def forward(self, x: Tensor, heads: str | None = None) -> Tensor:
        """``heads=None``: the selected head's (B, d); ``"all"``: (K, B, d); ``"active"``: (K', B, d) of
        :meth:`active_heads`, in index order."""
        if heads not in (None, "all", "active"):
            raise ValueError(f"heads must be None (the selected head), 'all' or 'active', got {heads!r}")
        if heads is None:
            head = self.heads[int(self.selected)]
            return head(x) if self.split == "none" else self._finish(head(self.trunk(x)))
        chosen = range(self.num_heads) if heads == "all" else self.active_heads()
        if self.split == "none":
            return torch.stack([self.heads[k](x) for k in chosen])
        f = self.trunk(x)
        if self.trunk_grad == "mean":  # the mean over the heads that are called
            f = _ScaleGrad.apply(f, 1.0 / len(chosen))
            inputs = {k: f for k in chosen}
        else:
            inputs = {k: f if k == self.trunk_grad else f.detach() for k in chosen}
        return torch.stack([self._finish(self.heads[k](inputs[k])) for k in chosen])

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, split={self.split}, trunk_grad={self.trunk_grad}"
