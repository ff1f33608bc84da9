"""Training entry point: ``python -m ddtas_lightning.train [overrides]``.

Composes conf/train.yaml, builds every object with ``hydra.utils.instantiate``, evaluates the untrained
model on the test classes, trains, evaluates the best checkpoint, writes ``metrics.json`` into the run
dir and returns the best validation R@1 (so Hydra sweepers can optimise it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.data.datamodule import DMLDataModule, check_batch_shape
from ddtas_lightning.module import DMLModule

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""


def validate_config(cfg: DictConfig) -> None:
    """Checks that would otherwise fail late (or silently) deep inside training."""
    try:
        check_batch_shape(int(cfg.data.batch_size), int(cfg.data.K))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if int(cfg.backbone.dim) <= 0:
        raise ConfigError(f"backbone.dim must be a positive integer, got {cfg.backbone.dim}")
    ks = list(cfg.metrics.recall_ks)
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"metrics.recall_ks must be a non-empty list of integers >= 1, got {ks}")
    if cfg.metrics.knn_backend not in ("torch", "faiss"):
        raise ConfigError(f"metrics.knn_backend must be 'torch' or 'faiss', got {cfg.metrics.knn_backend!r}")


def build(cfg: DictConfig) -> tuple[DMLDataModule, DMLModule]:
    """Instantiate the data module and the LightningModule from a composed config."""
    policy = instantiate(cfg.threshold_policy)
    datamodule = DMLDataModule(
        source=instantiate(cfg.dataset.source),
        transform=instantiate(cfg.transform),
        seed=int(cfg.seed),
        with_meta_batch=policy.needs_meta_batch,
        **{**OmegaConf.to_container(cfg.data, resolve=True),
           **({"meta_K": policy.meta_K} if policy.meta_K is not None else {})},
    )
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = DMLModule(
        model=instantiate(cfg.backbone),
        loss=instantiate(cfg.loss),
        miner=instantiate(cfg.miner),
        policy=policy,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        recall_ks=tuple(cfg.metrics.recall_ks),
        knn_backend=cfg.metrics.knn_backend,
        compute_nmi=bool(cfg.metrics.nmi),
        max_nonfinite_steps=int(cfg.module.max_nonfinite_steps),
        meta_batch_size=int(cfg.data.meta_batch_size) if policy.needs_meta_batch else 0,
        seed=int(cfg.seed),
    )
    return datamodule, module


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)


def resolve_ckpt(cfg: DictConfig, output_dir: Path) -> str | None:
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: checkpoint {path} does not exist")
    return str(path)


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()}


def train(cfg: DictConfig) -> float:
    """Run one experiment; returns the best validation R@1."""
    validate_config(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule, module = build(cfg)
    trainer = build_trainer(cfg)
    started = time.perf_counter()
    results: dict = {"task_name": cfg.task_name, "seed": int(cfg.seed)}

    if cfg.evaluate_before_training:
        module.test_prefix = "untrained"
        results["untrained"] = _floats(trainer.test(module, datamodule=datamodule, verbose=False)[0])
        module.test_prefix = "test"

    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt(cfg, output_dir))
    results["train_time_s"] = time.perf_counter() - fit_started
    results["val"] = _floats({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        results["best_val_R@1"] = float(ckpt_cb.best_model_score)
    else:
        results["best_val_R@1"] = results["val"].get("val/R@1", float("nan"))
    if cfg.test_after_training:
        ckpt = best if best else None
        results["test"] = _floats(trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0])
        results["best_checkpoint"] = best
    results["global_steps"] = int(trainer.global_step)
    results["nonfinite_skipped"] = int(module.nonfinite_total)
    results["wall_time_s"] = time.perf_counter() - started
    if trainer.is_global_zero:
        write_metrics(output_dir, cfg, results)
        print_summary(results)
    return results["best_val_R@1"]


def write_metrics(output_dir: Path, cfg: DictConfig, results: dict) -> Path:
    """metrics.json: the machine-readable result every run leaves in its run dir (sweeps read it)."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under a Hydra app (tests call train() directly)
        overrides = []
    payload = {
        **results,
        "overrides": overrides,
        "choices": {
            "dataset": cfg.dataset.name,
            "backbone": cfg.backbone.model_name,
            "loss": cfg.loss._target_.rsplit(".", 1)[-1],
            "miner": cfg.miner._target_.rsplit(".", 1)[-1],
            "threshold_policy": cfg.threshold_policy._target_.rsplit(".", 1)[-1],
        },
        "loss_threshold": cfg.loss.get("threshold"),
    }
    path = output_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)
    log.info("metrics written to %s", path)
    return path


def print_summary(results: dict) -> None:
    def row(name: str, m: dict, prefix: str) -> str:
        keys = [k for k in m if k.startswith(prefix + "/") and "/num_" not in k]
        return f"{name:<10}" + "  ".join(f"{k.split('/', 1)[1]} {100 * m[k]:6.2f}" for k in keys)

    print("\n== retrieval on the unseen test classes (%) ==")
    if "untrained" in results:
        print(row("untrained", results["untrained"], "untrained"))
    if "test" in results:
        print(row("trained", results["test"], "test"))
    print(f"training time {results['train_time_s']:.1f} s, {results['global_steps']} steps, "
          f"best val R@1 {100 * results['best_val_R@1']:.2f}\n")


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except Exception as exc:  # one clear line for bad input instead of a deep traceback
        from ddtas_lightning.data.records import DatasetLayoutError

        cause = _root_cause(exc)
        if isinstance(cause, ConfigError | DatasetLayoutError | FileNotFoundError) or (
            isinstance(cause, ValueError) and cause is not exc
        ):
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
