"""The one evaluation: ``train``'s final test and ``evaluate`` both call :func:`run_evaluation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.metrics.retrieval import per_class_metrics, per_query_metrics

SPLITS = ("test", "val")


@dataclass
class Evaluation:
    """metrics: ``{f"{prefix}/R@1": ..., ...}`` as logged; per_class: ``{label: {"R@1", "MAP@R",
    "num_queries"}}``; items: the gathered embeddings, labels, indices, roles (one row per dataset
    index); per_query: :func:`~ddtas_lightning.metrics.retrieval.per_query_metrics`."""

    metrics: dict[str, float]
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)
    items: dict[str, torch.Tensor] | None = None
    per_query: dict[str, torch.Tensor] | None = None


def run_evaluation(trainer: pl.Trainer, module, datamodule, *, split: str = "test", ckpt_path: str | None = None,
                   prefix: str = "test") -> Evaluation:
    """Evaluate ``module`` (with ``ckpt_path``'s weights if given) on ``split`` through ``trainer.test``:
    the metrics the module logs (DDP-gathered, padding removed) and, from the same embeddings, per-class
    R@1 / MAP@R. Every rank must call it (the test loop is collective)."""
    check_choice("split", split, SPLITS)
    if split == "val":  # the test loop reads datamodule.test_set: point it at the validation split
        datamodule.prepare_data()
        datamodule.setup("test")
        datamodule.test_set = datamodule.val_set
    module.keep_test_outputs, module.test_prefix = True, prefix
    try:
        metrics = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False,
                               weights_only=True)[0]  # tensors and plain values only (docs/security.md)
        items = module.test_outputs
    finally:
        module.keep_test_outputs, module.test_outputs, module.test_prefix = False, None, "test"
    per_query = per_query_metrics(items["embeddings"], items["labels"], ids=items["indices"],
                                  is_query=items["is_query"], is_gallery=items["is_gallery"],
                                  backend=module.test_metrics.backend)
    return Evaluation({k: float(v) for k, v in metrics.items()}, per_class_metrics(per_query), items, per_query)


def per_class_json(per_class: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {str(label): values for label, values in sorted(per_class.items())}


def save_per_query(path: Path, per_query: dict) -> None:
    """Every test query's dataset index, R@1 hit and AP@R (``compare`` bootstraps over them)."""
    import numpy as np

    arrays = {k: per_query[k].detach().cpu().numpy() for k in ("ids", "R@1", "MAP@R") if k in per_query}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
