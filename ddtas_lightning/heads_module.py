"""ManyHeadsModule: :class:`DMLModule` for ``threshold_policy=many_heads`` (the lambda grid in one run).

It wraps the configured backbone in :class:`~ddtas_lightning.models.many_heads.ManyHeads` (one head per
threshold of the policy), validates every head, and keeps the head with the best validation R@1 as the
model's ``selected`` head (the first on ties; set at every validation except Lightning's sanity check, and
carried by checkpoints). Logged per validation: the selected head's metrics as ``val/*`` (so
``val/R@1`` = the best head's, what checkpointing monitors), ``val/head<k>/R@1`` and ``val/head<k>/MAP@R``
of every head, ``val/selected_head`` and ``val/selected_lambda``; ``metrics.json`` keeps them (``val``,
``val_at_best``). Testing uses the selected head only (``model(x)``), unless the policy's
``test_all_heads``: then also ``test/head<k>/*`` of every head (a diagnostic, never a selection).

With successive halving (the policy's ``reduction_factor``) only the heads still trained are validated and
can be selected, and after a rung's validation (a training validation, not the sanity check nor a
validation after fit) the module stops the heads the policy's :func:`halve` drops (``val/active_heads``:
how many were validated).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.metrics import RetrievalMetrics
from ddtas_lightning.models.many_heads import ManyHeads
from ddtas_lightning.module import DMLModule
from ddtas_lightning.policies.many_heads import ManyHeadsThreshold, halve, is_rung

PER_HEAD = ("R@1", "MAP@R")  # the per-head metrics logged besides the selected head's full set


def select_head(r1: list[float]) -> int:
    """The index of the best validation R@1, the first on ties (NaN never wins)."""
    best = 0
    for k, value in enumerate(r1):
        if value == value and (r1[best] != r1[best] or value > r1[best]):
            best = k
    return best


class ManyHeadsModule(DMLModule):
    """See the module docstring; the arguments are :class:`DMLModule`'s."""

    def __init__(self, model: nn.Module, loss, miner, policy, *args, recall_ks=(1, 2, 4, 8),
                 knn_backend: str = "torch", compute_nmi: bool = True, cluster_stats: bool = False, **kwargs) -> None:
        if not isinstance(policy, ManyHeadsThreshold):
            raise ConfigError(f"ManyHeadsModule needs threshold_policy=many_heads, got {type(policy).__name__}")
        if cluster_stats:
            raise ConfigError("metrics.cluster_stats=true is not available with threshold_policy=many_heads")
        if not isinstance(model, ManyHeads):
            model = ManyHeads(model, policy.num_heads, split=policy.split, trunk_grad=policy.trunk_grad)
        super().__init__(model, loss, miner, policy, *args, recall_ks=recall_ks, knn_backend=knn_backend,
                         compute_nmi=compute_nmi, cluster_stats=False, **kwargs)

        def metrics() -> nn.ModuleList:
            return nn.ModuleList(RetrievalMetrics(recall_ks=self.recall_ks, backend=knn_backend, nmi=compute_nmi)
                                 for _ in range(policy.num_heads))

        self.head_val_metrics = metrics()
        self.head_test_metrics = metrics() if policy.test_all_heads else None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if self.policy.reduction_factor and self.trainer.world_size > 1 and ddp_kwargs is not None \
                and not ddp_kwargs.get("find_unused_parameters", False):
            # a stopped head's parameters get no gradient, which DDP's reducer refuses unless told
            raise ConfigError("threshold_policy.reduction_factor with several processes needs "
                              "trainer.strategy=ddp_find_unused_parameters_true (stopped heads get no gradient)")

    def _roles(self, index: Tensor, split: str) -> tuple[Tensor | None, Tensor | None]:
        """In-Shop's query / gallery roles of the batch's items (None, None for other data sets)."""
        dataset = getattr(self.trainer.datamodule, f"{split}_set", None) if self._trainer else None
        if dataset is None or not hasattr(dataset, "is_query"):
            return None, None
        cpu_index = index.cpu()
        return dataset.is_query[cpu_index].to(index.device), dataset.is_gallery[cpu_index].to(index.device)

    def _update_heads(self, metrics: nn.ModuleList, batch, split: str, heads: str = "all") -> Tensor:
        images, labels, index = batch
        is_query, is_gallery = self._roles(index, split)
        emb = self.model(images, heads=heads)
        chosen = range(len(metrics)) if heads == "all" else self.model.active_heads()
        for i, k in enumerate(chosen):
            metrics[k].update(emb[i], labels, index, is_query=is_query, is_gallery=is_gallery)
        return emb

    def validation_step(self, batch, batch_idx: int) -> None:
        self._update_heads(self.head_val_metrics, batch, "val", heads="active")

    def on_validation_epoch_end(self) -> None:
        active = self.model.active_heads()
        results: list[dict[str, float]] = [{} for _ in self.head_val_metrics]
        for k in active:
            results[k] = {name: float(v) for name, v in self.head_val_metrics[k].compute().items()}
            self.head_val_metrics[k].reset()
        r1 = [r.get("R@1", float("nan")) for r in results]
        best = select_head(r1) if any(r == r for r in r1) else active[0]
        training = not self.trainer.sanity_checking and self.trainer.state.fn == "fit"
        if not self.trainer.sanity_checking:
            self.model.selected.fill_(best)
            self.policy.selected.fill_(best)
        policy = self.policy
        if training and policy.reduction_factor:
            policy.validations += 1
            if is_rung(int(policy.validations), policy.min_resource, policy.reduction_factor):
                kept = halve([bool(a) for a in self.model.active], r1, policy.reduction_factor)
                self.model.active.copy_(torch.tensor(kept, dtype=torch.bool))
        values = {f"val/{k}": v for k, v in results[best].items()}
        values.update({f"val/head{k}/{name}": r[name] for k, r in enumerate(results) for name in PER_HEAD
                       if name in r})
        values["val/selected_head"] = float(best)
        values["val/selected_lambda"] = float(self.policy.thresholds[best])
        if policy.reduction_factor:
            values["val/active_heads"] = float(len(active))
        self.log_dict(values)

    def test_step(self, batch, batch_idx: int) -> None:
        if self.head_test_metrics is None:
            return super().test_step(batch, batch_idx)
        emb = self._update_heads(self.head_test_metrics, batch, "test")
        images, labels, index = batch
        is_query, is_gallery = self._roles(index, "test")
        selected = emb[int(self.model.selected)]
        self.test_metrics.update(selected, labels, index, is_query=is_query, is_gallery=is_gallery)

    def on_test_epoch_end(self) -> None:
        if self.head_test_metrics is not None:
            values = {}
            for k, m in enumerate(self.head_test_metrics):
                values.update({f"{self.test_prefix}/head{k}/{name}": float(v) for name, v in m.compute().items()
                               if name in PER_HEAD})
                m.reset()
            self.log_dict(values)
        super().on_test_epoch_end()


def module_class(policy) -> type[DMLModule]:
    """The LightningModule class a policy trains with."""
    return ManyHeadsModule if getattr(policy, "many_heads", False) else DMLModule


__all__ = ["ManyHeadsModule", "module_class", "select_head"]
