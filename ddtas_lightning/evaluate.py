"""Evaluation entry point: ``python -m ddtas_lightning.evaluate ckpt_path=... [dataset=...] [split=test|val]``.

Rebuilds the model from the config saved in the checkpoint (``checkpoint_compat.CONFIG_KEY``, or the
run dir's ``.hydra/config.yaml`` for checkpoints written before it was saved), evaluates it on the
chosen dataset and split, and writes into its run dir (``outputs/eval/<date>_<time>/``):

- ``metrics.json``: the training run's metrics (``test/R@1``, ``test/MAP@R``, ...) plus ``per_class``
  (R@1 and MAP@R of each class's queries) for this split;
- ``inspect/gallery.png`` + ``gallery.html`` (+ ``gallery.json``): the N worst and N random queries with
  their top-k neighbours, right/wrong marked (:mod:`ddtas_lightning.inspect.gallery`);
- ``inspect/embedding_map.png``: t-SNE of the embeddings coloured by class;
- ``export/``: embeddings, labels, ids, roles and image paths as ``.npy`` and a faiss index
  (:mod:`ddtas_lightning.inspect.exports`).

The evaluation itself is :func:`ddtas_lightning.evaluation.run_evaluation`, the one ``train``'s final test calls.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.evaluation import SPLITS, Evaluation, per_class_json, run_evaluation
from ddtas_lightning.runtime.builder import build
from ddtas_lightning.runtime.checkpoint_compat import CONFIG_KEY, check_checkpoint_compat
from ddtas_lightning.runtime.errors import exit_code_for, root_cause

log = logging.getLogger(__name__)


def load_run_config(ckpt_path: Path) -> tuple[DictConfig, dict]:
    """The checkpoint (loaded on the CPU) and the training run's config saved in it (or next to it)."""
    if not ckpt_path.is_file():
        what = "is a directory, not a checkpoint file" if ckpt_path.is_dir() else "does not exist"
        raise ConfigError(f"ckpt_path: checkpoint {ckpt_path} {what} (expected a .ckpt file written by "
                          "ddtas_lightning.train, e.g. <run dir>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"ckpt_path: cannot read checkpoint {ckpt_path}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path: {ckpt_path} is not a Lightning checkpoint (no 'state_dict' entry)")
    saved = ckpt.get(CONFIG_KEY)
    cfg = OmegaConf.create(saved) if isinstance(saved, dict) else None
    hydra_file = ckpt_path.parent.parent / ".hydra" / "config.yaml"
    if cfg is None and hydra_file.is_file():
        cfg = OmegaConf.load(hydra_file)
    if cfg is None:
        raise ConfigError(f"ckpt_path: {ckpt_path} carries no training config (checkpoint key 'ddtas_config') "
                          f"and {hydra_file} does not exist; evaluate rebuilds the model from it")
    return cfg, ckpt


def eval_config(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """The training run's config (as saved: unresolved) with what ``conf/eval.yaml`` changes: the
    paths (so ``${paths.data_dir}`` is this machine's), dataset, batch size, workers, k-NN backend."""
    run_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=False))
    with open_dict(run_cfg):
        run_cfg.paths = OmegaConf.to_container(cfg.paths, resolve=True)
    try:  # the model as trained: its transform / backbone keep the training dataset's values (image size, ...)
        run_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))
    except Exception:  # an interpolation that cannot be resolved here: left as saved
        pass
    with open_dict(run_cfg):
        if cfg.get("dataset") is not None:
            run_cfg.dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
            run_cfg.metrics.recall_ks = list(cfg.dataset.recall_ks)
        for key in ("eval_batch_size", "num_workers"):
            if cfg.data.get(key) is not None:
                run_cfg.data[key] = cfg.data[key]
        for key in ("knn_backend", "nmi"):
            if cfg.metrics.get(key) is not None:
                run_cfg.metrics[key] = cfg.metrics[key]
        run_cfg.data.persistent_workers = False
    return run_cfg


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``conf/eval.yaml``; returns the metrics.json payload."""
    check_choice("split", cfg.split, SPLITS)
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    run_cfg, ckpt = load_run_config(ckpt_path)
    run_cfg = eval_config(cfg, run_cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule, module = build(run_cfg)
    check_checkpoint_compat(ckpt_path, module)  # weights from another model: one clear error
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, default_root_dir=output_dir,
                         enable_progress_bar=sys.stdout.isatty(), enable_model_summary=False)
    module.load_state_dict(ckpt["state_dict"])  # the weights only (trainer.test(ckpt_path) would restore loops)
    result = run_evaluation(trainer, module, datamodule, split=cfg.split)
    dataset = datamodule.test_set  # the evaluated split (run_evaluation points test_set at val)
    paths = list(getattr(dataset, "paths", [])) or [f"#{i}" for i in range(int(result.items["indices"].max()) + 1)]
    payload = {
        "task_name": "eval",
        "checkpoint": str(ckpt_path),
        "dataset": run_cfg.dataset.name,
        "split": cfg.split,
        "test": result.metrics,
        "per_class": per_class_json(result.per_class),
        "outputs": write_inspection(cfg.inspect, output_dir, result, paths, module.test_metrics.backend,
                                    images=hasattr(dataset, "paths")),
    }
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    (output_dir / "eval_config.yaml").write_text(OmegaConf.to_yaml(run_cfg))  # what was rebuilt and evaluated
    print_eval_summary(payload, path)
    return payload


def write_inspection(opts: DictConfig, output_dir: Path, result: Evaluation, paths: list, backend: str,
                     images: bool = True) -> dict[str, str]:
    """Gallery, embedding map and exports, as ``conf/eval.yaml``'s ``inspect`` asks; returns their paths."""
    from ddtas_lightning.inspect import (
        embedding_map,
        export_embeddings,
        gallery_rows,
        render_gallery_html,
        render_gallery_png,
        select_queries,
    )

    out: dict[str, str] = {}
    inspect_dir = output_dir / "inspect"
    items = result.items
    if opts.gallery and images:
        inspect_dir.mkdir(parents=True, exist_ok=True)
        queries = select_queries(result.per_query, int(opts.n_worst), int(opts.n_random), seed=0)
        rows = gallery_rows(items, queries, paths, int(opts.top_k), result.per_query, backend=backend)
        (inspect_dir / "gallery.json").write_text(json.dumps(rows, indent=1))
        out["gallery_png"] = str(render_gallery_png(rows, inspect_dir / "gallery.png", int(opts.top_k),
                                                    thumb=int(opts.thumb)))
        out["gallery_html"] = str(render_gallery_html(rows, inspect_dir / "gallery.html"))
        out["gallery_json"] = str(inspect_dir / "gallery.json")
    elif opts.gallery:
        log.info("inspect.gallery: the dataset has no image files; no gallery")
    if opts.map:
        inspect_dir.mkdir(parents=True, exist_ok=True)
        q = items["is_query"]
        png, _, _ = embedding_map(items["embeddings"][q].float().cpu().numpy(), items["labels"][q].cpu().numpy(),
                                  inspect_dir / "embedding_map.png", max_points=int(opts.map_max_points))
        out["embedding_map"] = str(png)
    if opts.export:
        out["export"] = str(export_embeddings(output_dir / "export", items, paths))
    return out


def print_eval_summary(payload: dict, path: Path) -> None:
    m = payload["test"]
    keys = [k for k in m if "/num_" not in k]
    print(f"\n== {payload['dataset']} {payload['split']} ({int(m.get('test/num_queries', 0))} queries) ==")
    print("  ".join(f"{k.split('/', 1)[1]} {100 * m[k]:6.2f}" for k in keys))
    worst = sorted(payload["per_class"].items(), key=lambda kv: kv[1]["MAP@R"])[:5]
    if worst:
        print("worst classes by MAP@R: " + ", ".join(f"{c} ({100 * v['MAP@R']:.1f})" for c, v in worst))
    for name, p in payload["outputs"].items():
        print(f"{name:<14} {p}")
    print(f"metrics        {path}\n")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except Exception as exc:  # one clear line for bad input instead of a deep traceback
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"error: {root_cause(exc)}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
