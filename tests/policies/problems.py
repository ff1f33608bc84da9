"""Tiny float64 problems for the meta-learning policies, and an independent reference of the meta
objective (model copy + in-place SGD, no torch.func) to check the policies against."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.losses import MultiSimilarityLoss, SoftContrastiveLoss
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.policies.base import StepBatch


class TinyEmbedder(nn.Module):
    """x -> fc1 -> [BatchNorm1d] -> tanh -> fc2 -> L2 normalise."""

    def __init__(self, d_in: int = 6, hidden: int = 10, dim: int = 5, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.fc2(torch.tanh(self.bn(self.fc1(x)))), dim=1)


def make_model(seed: int = 0, bn: str | None = None) -> TinyEmbedder:
    """bn: None (no BatchNorm), "train" (batch statistics) or "eval" (frozen running statistics)."""
    torch.manual_seed(seed)
    model = TinyEmbedder(bn=bn is not None).double()
    if bn is not None:
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            model.bn.running_mean.uniform_(-0.3, 0.3)
            model.bn.running_var.uniform_(0.5, 1.5)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.2, 0.2)
        model.train()
        if bn == "eval":
            model.bn.eval()
    return model


def make_batch(seed: int = 0, classes: int = 4, k: int = 3, meta_classes: int = 3, meta_k: int = 2) -> StepBatch:
    g = torch.Generator().manual_seed(1000 + seed)
    labels = torch.arange(classes).repeat_interleave(k)
    meta_labels = torch.arange(meta_classes).repeat_interleave(meta_k)
    images = torch.randn(len(labels), 6, generator=g, dtype=torch.float64)
    meta_images = torch.randn(len(meta_labels), 6, generator=g, dtype=torch.float64)
    return StepBatch(images, labels, meta_images=meta_images, meta_labels=meta_labels)


LOSSES = {
    # smaller negative scales than the papers' 40 keep the tiny problems away from saturation
    "soft_contrastive": lambda: SoftContrastiveLoss(scale_pos=2.0, scale_neg=10.0, threshold=0.5),
    "ms": lambda: MultiSimilarityLoss(scale_pos=2.0, scale_neg=10.0, threshold=0.5),
}


def reference_meta_objective(
    model: nn.Module,
    loss_fn,
    selection: PairSelection,
    batch: StepBatch,
    lam: Tensor,
    meta_lam: Tensor,
    eta: float,
) -> Tensor:
    """``L_meta(theta - eta * grad_theta L_train(theta, lam))`` the plain way: deep-copy the model,
    take a real SGD step on the copy, embed the meta batch with it (all pairs, ``meta_lam``)."""
    m = copy.deepcopy(model)
    emb = m(batch.images)
    train_loss = loss_fn(emb @ emb.T, selection, threshold=lam)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(train_loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(eta * g)
        emb_m = m(batch.meta_images)
        return loss_fn(emb_m @ emb_m.T, PairSelection.all_pairs(batch.meta_labels), threshold=meta_lam)


def central_difference(f, x: Tensor, h: float = 1e-5) -> Tensor:
    """d f / d x by central differences, element by element (x: 0-d or 1-d)."""
    flat = x.detach().clone().reshape(-1)
    out = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        out[i] = (f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * h)
    return out.reshape(x.shape)
