"""MLPEmbedder: vectors -> fully connected layers -> L2-normalised embeddings (the synthetic-data backbone).

The NSPA author's network for the synthetic Gaussian clusters was not recovered (spec docs/papers/nspa.md
§2.1, §5.9: "a small MLP"); this one is Linear -> ReLU blocks and a linear head, with the embeddings
L2-normalised like :class:`~ddtas_lightning.models.Embedder`'s (the miners and losses read the cosine
similarity of unit vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.models.head_init import HEAD_INITS, init_head


class MLPEmbedder(nn.Module):
    """``in_dim`` features (the input is flattened) -> hidden layers -> ``dim``-d embedding.

    hidden: widths of the hidden Linear + ReLU layers (empty: a single linear map). batch_norm: a
    BatchNorm1d after each hidden Linear. normalize: L2-normalise the output (default, as Embedder).
    relu_output: a ReLU on the embedding (the NSPA author's ``Dense(encodings_len, relu)`` head; with
    ``normalize=False`` the embeddings are raw non-negative vectors, the paper's setting).
    model_name: only a label (train.py records ``backbone.model_name`` in metrics.json).
    head_init: ``"default"`` (PyTorch's initialisation) or ``"identity"`` (no hidden layers, ``dim == in_dim``:
    the head starts as the identity map, so the untrained model *is* its input features; on a pretrained
    backbone's cached features training then starts at them, and the run's untrained evaluation is the
    raw-feature baseline it must beat, paired by seed).
    """

    def __init__(
        self,
        in_dim: int = 32,
        dim: int = 32,
        hidden: Sequence[int] = (128, 128),
        batch_norm: bool = False,
        normalize: bool = True,
        model_name: str = "mlp",
        relu_output: bool = False,
        head_init: str = "default",
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if in_dim <= 0 or dim <= 0 or any(h <= 0 for h in hidden):
            raise ValueError(
                f"backbone in_dim, dim and hidden widths must be positive, got {in_dim}, {dim}, {hidden}"
            )
        layers: list[nn.Module] = []
        width = int(in_dim)
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, int(dim))
        self.relu_output = bool(relu_output)
        if head_init not in HEAD_INITS:
            raise ValueError(f"backbone.head_init must be one of {', '.join(HEAD_INITS)}; got {head_init!r}")
        if head_init == "identity" and hidden:
            raise ValueError(f"backbone.head_init=identity needs backbone.hidden=[], got {hidden}")
        init_head(self.head, head_init)
        self.in_dim, self.dim, self.normalize, self.model_name = (
            int(in_dim),
            int(dim),
            bool(normalize),
            model_name,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_dim:
            raise ValueError(
                f"MLPEmbedder expects {self.in_dim} input features, got {x.shape[1]} (set backbone.in_dim)"
            )
        x = self.head(self.body(x))
        if self.relu_output:
            x = F.relu(x)
        return F.normalize(x, dim=1) if self.normalize else x
