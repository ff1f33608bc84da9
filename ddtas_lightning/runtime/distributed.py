"""Collectives used by the training step (identity functions when torch.distributed is not initialised).

The framework's DDP semantics: every rank embeds its share of the *global* P x K batch, the
embeddings are gathered (with gradient), and every rank computes the loss of the whole global batch
(mining, thresholds, meta gradients, per-pair weights: all on the same global similarity matrix, so
all ranks agree without further communication). The gradient of a gathered row flows back to the
rank that produced it (summed over ranks by ``all_gather``'s backward); DDP's averaging of parameter
gradients then gives exactly the gradient of the single-process run with batch B (W ranks x B/W).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(t: Tensor) -> Tensor:
    """Rows of ``t`` from every rank, concatenated in rank order, differentiable w.r.t. the local rows.

    Every rank must pass a tensor of the same shape. Backward: each rank receives the sum over ranks
    of the gradients of its own rows (``torch.distributed.nn.functional.all_gather``)."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


@torch.no_grad()
def gather(t: Tensor) -> Tensor:
    """Rows of ``t`` from every rank, concatenated in rank order (no gradient)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over the ranks (a collective: every rank must call it at the same point)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return t


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """In-place average over the ranks of a list of tensors (one flattened collective)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


__all__ = ["all_reduce_mean", "all_reduce_mean_", "gather", "gather_with_grad", "is_distributed", "rank",
           "world_size"]
