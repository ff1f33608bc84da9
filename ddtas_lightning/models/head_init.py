"""How an embedding head starts: PyTorch's default initialisation, or the identity map."""

from __future__ import annotations

import torch
from torch import nn

HEAD_INITS = ("default", "identity")


def init_head(head: nn.Linear, mode: str) -> None:
    """``identity``: the head starts as the identity map (``dim`` = the backbone's feature size), so the
    untrained embedder is the pretrained backbone's own pooled features and training starts there (a random
    projection starts below them: see conf/experiment/threshold_study_pretrained.yaml)."""
    if mode == "identity":
        if head.in_features != head.out_features:
            raise ValueError(f"backbone.head_init=identity needs backbone.dim = its input size "
                             f"({head.in_features}), got {head.out_features}")
        with torch.no_grad():
            nn.init.eye_(head.weight)
            nn.init.zeros_(head.bias)
