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
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.checkpoint_compat import check_checkpoint_compat
from ddtas_lightning.checkpointing import with_atomic_checkpoint_io
from ddtas_lightning.cluster import cluster_plugins
from ddtas_lightning.config_checks import check_run_values
from ddtas_lightning.data.datamodule import SELECTIONS, DMLDataModule, check_batch_shape
from ddtas_lightning.data.image_dataset import BAD_IMAGE_MODES
from ddtas_lightning.evaluate import per_class_json, run_evaluation
from ddtas_lightning.module import DMLModule, NonFiniteLossError
from ddtas_lightning.run_dir import check_run_dir_writable, run_callbacks
from ddtas_lightning.run_output import progress_options, show_config
from ddtas_lightning.run_record import ComputeMeter, ValidationHistory, process_cpu_s
from ddtas_lightning.signals import SIGTERMException, exit_for_signal
from ddtas_lightning.validation import ConfigError, as_float, as_int, check_choice

log = logging.getLogger(__name__)


def validate_config(cfg: DictConfig) -> None:
    """Checks that would otherwise fail late (after minutes of evaluation), with a deep traceback, or
    silently, deep inside training. Each names the key and what is allowed (see docs/bad_inputs.md);
    values the components check themselves (loss, miner, policy, backbone options) are checked there."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} has no value ('???'); set it on the command line, e.g. "
                          f"{missing[0]}=<value>" + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else ""))
    check_run_values(cfg)  # NaN/inf anywhere, seed, recall_ks, trainer.max_epochs, dataset.image_size
    data = cfg.data
    batch_size, k = as_int("data.batch_size", data.batch_size, 1), as_int("data.K", data.K)
    try:
        check_batch_shape(batch_size, k)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    as_float("data.val_fraction", data.val_fraction, 0.0, 1.0, high_open=True)
    check_choice("data.selection", data.selection, SELECTIONS)
    if data.val_folds is not None:
        as_int("data.val_folds", data.val_folds, 2)
    as_int("data.val_fold", data.val_fold, 0)
    check_choice("data.on_bad_image", data.on_bad_image, BAD_IMAGE_MODES)
    if data.batches_per_epoch is not None:
        as_int("data.batches_per_epoch (null: one pass over the train images)", data.batches_per_epoch, 1)
    as_int("data.eval_batch_size", data.eval_batch_size, 1)
    as_int("data.num_workers", data.num_workers, 0)
    _validate_meta_batch(cfg)
    as_int("backbone.dim", cfg.backbone.dim, 1)
    ks = list(cfg.metrics.recall_ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ConfigError(f"metrics.recall_ks must be a non-empty list of integers >= 1, got {ks}")
    check_choice("metrics.knn_backend", cfg.metrics.knn_backend, ("torch", "faiss"))
    as_float("optimizer.lr", cfg.optimizer.lr, 0.0)
    if cfg.optimizer.get("weight_decay") is not None:
        as_float("optimizer.weight_decay", cfg.optimizer.weight_decay, 0.0)
    as_int("module.max_nonfinite_steps", cfg.module.max_nonfinite_steps, 1)
    # Lightning reports this as a MisconfigurationException with a traceback; it is the common case of
    # trainer=gpu (or a GPU recipe) started on a machine without CUDA.
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is available; "
                          "use trainer=cpu or trainer.accelerator=auto")


def _validate_meta_batch(cfg: DictConfig) -> None:
    """The meta batch (P_m x K_m) of a policy that needs one, and a learned lambda's start inside its
    bounds when it starts at ``loss.threshold`` (otherwise only found at the first training step)."""
    policy_cls = hydra.utils.get_class(cfg.threshold_policy._target_)
    if getattr(policy_cls, "needs_meta_batch", False):
        size = as_int("data.meta_batch_size", cfg.data.meta_batch_size, 1)
        k = getattr(policy_cls, "meta_K", None) or as_int("data.meta_K", cfg.data.meta_K, 1)
        if size % k != 0 or size < 2 * k:
            raise ConfigError(f"data.meta_batch_size={size} must be a multiple of data.meta_K={k} with at "
                              f"least 2 classes (e.g. {max(2, size // k) * k})")
    policy = cfg.threshold_policy
    if {"init", "min", "max"} <= set(policy) and policy.init is None and cfg.loss.get("threshold") is not None:
        lam = as_float("loss.threshold", cfg.loss.threshold)
        low = as_float("threshold_policy.min", policy.min)
        high = as_float("threshold_policy.max", policy.max)
        if low <= high and not low <= lam <= high:  # min > max: the policy's own message
            raise ConfigError(
                f"loss.threshold={lam} is the initial lambda (threshold_policy.init=null) but lies outside "
                f"[threshold_policy.min, threshold_policy.max] = [{low}, {high}]; set threshold_policy.init "
                "or the bounds"
            )


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
        optimizer=instantiate(optimizer_without_loss_lr(cfg.optimizer)),
        loss_lr=cfg.optimizer.get("loss_lr"),
        scheduler=scheduler,
        recall_ks=tuple(cfg.metrics.recall_ks),
        knn_backend=cfg.metrics.knn_backend,
        compute_nmi=bool(cfg.metrics.nmi),
        cluster_stats=bool(cfg.metrics.get("cluster_stats", False)),
        max_nonfinite_steps=int(cfg.module.max_nonfinite_steps),
        meta_batch_size=int(cfg.data.meta_batch_size) if policy.needs_meta_batch else 0,
        seed=int(cfg.seed),
    )
    return datamodule, module


def optimizer_without_loss_lr(node: DictConfig) -> DictConfig:
    """``optimizer`` minus ``loss_lr`` (the learning rate of the loss's own parameters, a key of ours)."""
    node = OmegaConf.masked_copy(node, [k for k in node if k != "loss_lr"]) if "loss_lr" in node else node
    return node


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    # Checkpoint files are written atomically (a kill mid-save keeps the previous last.ckpt), unless
    # the trainer config chooses its own CheckpointIO plugin.
    plugins = with_atomic_checkpoint_io(instantiate(cfg.trainer.get("plugins")))
    plugins += cluster_plugins()  # DDP ranks started by a submitit sweep job join, not re-launch
    callbacks += run_callbacks(cfg)  # config saved in checkpoints, last.ckpt at SIGTERM/SIGINT, R@K check
    # What metrics.json records about the run itself (compute, the selected checkpoint's val metrics).
    callbacks += [ComputeMeter(), ValidationHistory()]
    # Output that is not a terminal (a log file, SLURM) gets one progress line per N steps, not bar frames.
    progress = progress_options(cfg.trainer, callbacks)
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins, **progress)


def _callback(trainer: pl.Trainer, kind: type):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def resolve_ckpt(cfg: DictConfig, output_dir: Path, module: pl.LightningModule | None = None) -> str | None:
    """The checkpoint to resume from (``ckpt_path``: a path, ``last``, or null). With ``module``, also
    checks that the checkpoint fits the module this config builds (one ConfigError naming the
    mismatch instead of Lightning's strict-load traceback after the untrained evaluation)."""
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        path = last if last.is_file() else None
    else:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
            raise ConfigError(f"ckpt_path: checkpoint {path} {what} (expected a .ckpt file, 'last' for "
                              "<run dir>/checkpoints/last.ckpt, or null)")
    if path is not None and module is not None:
        check_checkpoint_compat(path, module, cfg)
    return None if path is None else str(path)


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()}


def evaluate_untrained(trainer: pl.Trainer, module: DMLModule, datamodule: DMLDataModule, output_dir: Path,
                       resuming: str | None) -> dict:
    """Test metrics of the untrained model, kept in ``untrained.json`` so a resumed run reuses them
    (the model a resume builds first is not the one it continues, and the evaluation costs compute)."""
    saved = output_dir / "untrained.json"
    if resuming and saved.is_file():
        return json.loads(saved.read_text())
    module.test_prefix = "untrained"
    metrics = _floats(trainer.test(module, datamodule=datamodule, verbose=False)[0])
    module.test_prefix = "test"
    if trainer.is_global_zero:
        saved.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def train(cfg: DictConfig) -> float:
    """Run one experiment; returns the best validation R@1."""
    validate_config(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir_writable(output_dir)  # a read-only or full run dir fails now, not at the first save
    show_config(cfg, output_dir)  # the composed config as a tree, printed and saved (config_tree.yaml)
    datamodule, module = build(cfg)
    ckpt_path = resolve_ckpt(cfg, output_dir, module)  # before any work: a bad checkpoint fails fast
    trainer = build_trainer(cfg)
    started, cpu_started = time.perf_counter(), process_cpu_s()
    results: dict = {"task_name": cfg.task_name, "seed": int(cfg.seed),
                     # where checkpoints (and so sweep picks) were chosen; "test" is the papers' protocol
                     "selection": str(cfg.data.selection)}

    if cfg.evaluate_before_training:
        results["untrained"] = evaluate_untrained(trainer, module, datamodule, output_dir, resuming=ckpt_path)

    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    results["train_time_s"] = time.perf_counter() - fit_started
    results["val"] = _floats({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        results["best_val_R@1"] = float(ckpt_cb.best_model_score)
    else:
        results["best_val_R@1"] = results["val"].get("val/R@1", float("nan"))
    results["val_at_best"] = _callback(trainer, ValidationHistory).best()
    results["compute"] = _callback(trainer, ComputeMeter).summary()
    if cfg.test_after_training:
        ckpt = best if best else None
        final = run_evaluation(trainer, module, datamodule, ckpt_path=ckpt)  # the code evaluate.py runs
        results["test"], results["test_per_class"] = final.metrics, per_class_json(final.per_class)
        results["best_checkpoint"] = best
        if trainer.is_global_zero and final.per_query is not None:
            save_per_query(output_dir / "per_query_test.npz", final.per_query)  # compare's bootstrap
    results["global_steps"] = int(trainer.global_step)
    results["nonfinite_skipped"] = int(module.nonfinite_total)
    results["wall_time_s"] = time.perf_counter() - started
    results["compute"]["run_cpu_s"] = process_cpu_s() - cpu_started  # this process: + evaluations
    if trainer.is_global_zero:
        write_metrics(output_dir, cfg, results)
        print_summary(results)
    return results["best_val_R@1"]


def save_per_query(path: Path, per_query: dict) -> None:
    """Every test query's dataset index, R@1 hit and AP@R (``compare`` bootstraps over them)."""
    import numpy as np

    arrays = {k: per_query[k].detach().cpu().numpy() for k in ("ids", "R@1", "MAP@R") if k in per_query}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


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
        "tags": list(cfg.get("tags") or []),
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
          f"best val R@1 {100 * results['best_val_R@1']:.2f}"
          + (" (validated on the TEST classes: data.selection=test, the papers' protocol)"
             if results.get("selection") == "test" else " (held-out train classes)") + "\n")


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def exit_code_for(exc: BaseException) -> int | None:
    """How the CLI ends for ``exc``: 2 = bad input (one ``error:`` line), 3 = training diverged
    (non-finite guard; the message names the checkpoint), None = a bug (re-raised with its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ddtas_lightning.data.records import DatasetLayoutError

    cause = _root_cause(exc)
    # MisconfigurationException: Lightning's own verdict on trainer.* values (devices=0, ...).
    bad_input = ConfigError | DatasetLayoutError | FileNotFoundError | MisconfigurationException
    if isinstance(cause, bad_input) or (isinstance(cause, ValueError) and cause is not exc):
        return 2
    if isinstance(cause, NonFiniteLossError):
        return 3
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except SIGTERMException as exc:  # SIGTERM/SIGINT: last.ckpt saved at the signal, exit 143/130
        sys.exit(exit_for_signal(exc, cfg.paths.output_dir, _overrides()))
    except Exception as exc:  # one clear line for bad input instead of a deep traceback
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"error: {_root_cause(exc)}", file=sys.stderr)
        _to_log_files(f"error: {_root_cause(exc)}")  # the job's log file, where compare finds it
        if _in_multirun():
            raise  # Hydra records the job as failed and the sweep goes on (compare reports it)
        sys.exit(code)


def _to_log_files(message: str) -> None:
    """``message`` into the run's log files only (Hydra's job log), not a second time on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under a Hydra app
        return []


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under a Hydra app
        return False


if __name__ == "__main__":
    main()
