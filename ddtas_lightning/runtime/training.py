"""One training run: check the config, build, evaluate the untrained model on the test classes, train,
evaluate the selected checkpoint, write ``metrics.json`` into the run dir. ``python -m ddtas_lightning.train``
calls :func:`train`; it returns the best validation R@1 (so Hydra sweepers can optimise it)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddtas_lightning.config.checks import validate_config
from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.datamodule import DMLDataModule
from ddtas_lightning.evaluation import per_class_json, run_evaluation, save_per_query
from ddtas_lightning.module import DMLModule, NonFiniteLossError
from ddtas_lightning.report.wandb_logger import finish_wandb
from ddtas_lightning.runtime.builder import build, build_trainer, find_callback
from ddtas_lightning.runtime.checkpoint_compat import check_checkpoint_compat
from ddtas_lightning.runtime.pruning import OptunaPruning
from ddtas_lightning.runtime.run_dir import check_run_dir_writable
from ddtas_lightning.runtime.run_end import (
    NO_VALIDATION,
    final_thresholds,
    remove_last_checkpoint,
    tested_weights,
    validate_at_end,
)
from ddtas_lightning.runtime.run_output import quiet_third_party, show_config
from ddtas_lightning.runtime.run_record import ComputeMeter, TrainLossTrace, ValidationHistory, process_cpu_s

log = logging.getLogger(__name__)


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
        refuse_weights_only(path)
    return None if path is None else str(path)


def refuse_weights_only(path: Path) -> None:
    """A resume needs the optimiser and loop state: a weights-only checkpoint (the best one) has neither,
    and Lightning would stop inside ``fit``, after the untrained evaluation, with a KeyError."""
    from ddtas_lightning.runtime.safe_load import load_torch_file

    ckpt = load_torch_file(path, what="ckpt_path", noun="checkpoint", mmap=True)
    if isinstance(ckpt, dict) and "optimizer_states" not in ckpt:
        raise ConfigError(
            f"ckpt_path: {path} is a weights-only checkpoint (the best checkpoint: weights and buffers, no "
            "optimiser or loop state), so training cannot continue from it; resume from "
            "<run dir>/checkpoints/last.ckpt (ckpt_path=last), or evaluate it: python -m "
            f"ddtas_lightning.evaluate ckpt_path={path}")


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
    quiet_third_party()  # Lightning's litlogger tip, torch deprecations raised inside Lightning / torch itself
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # docs/security.md
    results["train_time_s"] = time.perf_counter() - fit_started
    results.update(final_thresholds(module, trainer))  # the threshold the run ended with (learned: its last value)
    # The last training step is always validated (and may give the best checkpoint): run_end.py
    results["validated_at_end"] = validate_at_end(trainer, module, datamodule)
    if trainer.fast_dev_run:
        results["fast_dev_run"] = True  # one batch per split: a smoke test, not a result (the summary says so)
    results["val"] = _floats({k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        results["best_val_R@1"] = float(ckpt_cb.best_model_score)
    else:
        results["best_val_R@1"] = results["val"].get("val/R@1", float("nan"))
    results["val_at_best"] = find_callback(trainer, ValidationHistory).best()
    results["compute"] = find_callback(trainer, ComputeMeter).summary()
    results["train_loss"] = find_callback(trainer, TrainLossTrace).summary()  # first step / last epoch / last step
    results["status"] = "trained"
    pruning = find_callback(trainer, OptunaPruning)
    if pruning is not None and pruning.summary() is not None:  # a pruned sweep trial: no test evaluation
        results["status"], results["pruned"] = "pruned", pruning.summary()
    if int(module.nonfinite_total) > 0 and int(trainer.global_step) == 0:
        fail_untrained(trainer, module, output_dir, cfg, results, started, cpu_started)
    if cfg.test_after_training and results["status"] == "trained":
        ckpt = best if best else None
        final = run_evaluation(trainer, module, datamodule, ckpt_path=ckpt)  # the code evaluate.py runs
        results["test"], results["test_per_class"] = final.metrics, per_class_json(final.per_class)
        results["best_checkpoint"] = best
        results["tested_weights"] = tested_weights(best, ckpt_cb.best_model_score if ckpt_cb is not None else None,
                                                   results["val_at_best"], output_dir)
        if trainer.is_global_zero and final.per_query is not None:
            save_per_query(output_dir / "per_query_test.npz", final.per_query)  # compare's bootstrap
    results["global_steps"] = int(trainer.global_step)
    results["nonfinite_skipped"] = int(module.nonfinite_total)
    results["wall_time_s"] = time.perf_counter() - started
    results["compute"]["run_cpu_s"] = process_cpu_s() - cpu_started  # this process: + evaluations
    if trainer.is_global_zero:
        write_metrics(output_dir, cfg, results)
        print_summary(results)
        remove_last_checkpoint(cfg, output_dir)  # callbacks.keep_last=false: a finished run keeps its best only
    finish_wandb(trainer.loggers)  # logger=wandb: its closing lines now, not from its exit hook
    return results["best_val_R@1"]


def fail_untrained(trainer: pl.Trainer, module: DMLModule, output_dir: Path, cfg: DictConfig, results: dict,
                   started: float, cpu_started: float) -> None:
    """Every update was skipped as non-finite (fewer steps than module.max_nonfinite_steps, so the guard
    never stopped the run): the model is the untrained one. metrics.json records that (``"status":
    "not_trained"``, no test metrics) and the run fails like the non-finite guard (exit 3)."""
    skipped = int(module.nonfinite_total)
    message = (f"every training update was skipped: {skipped} non-finite losses/gradients and 0 optimiser updates "
               f"(the run ended before module.max_nonfinite_steps={module.max_nonfinite_steps} in a row stopped it); "
               "the model is the untrained one, so no test evaluation. Lower optimizer.lr or check the data")
    results.update(status="not_trained", trained=False, error=message, global_steps=0, nonfinite_skipped=skipped,
                   wall_time_s=time.perf_counter() - started)
    results["compute"]["run_cpu_s"] = process_cpu_s() - cpu_started
    if trainer.is_global_zero:
        write_metrics(output_dir, cfg, results)
    raise NonFiniteLossError(message)


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

    if results.get("fast_dev_run"):
        print("\n== fast_dev_run (debug=fdr): ONE batch of each split, a smoke test of the wiring: NOT A RESULT ==")
        print("== retrieval on one test batch (%), not a result ==")
    else:
        print("\n== retrieval on the unseen test classes (%) ==")
    if "untrained" in results:
        print(row("untrained", results["untrained"], "untrained"))
    if "test" in results:
        print(row("trained", results["test"], "test"))
    if results.get("status") == "pruned":
        print(f"pruned by the Optuna study at validation {results['pruned']['at_validation']}: no test evaluation")
    best = results["best_val_R@1"]
    print(f"training time {results['train_time_s']:.1f} s, {results['global_steps']} steps, "
          + ("best val R@1 n/a (no validation)" if best != best else f"best val R@1 {100 * best:.2f}")
          + (" (validated on the TEST classes: data.selection=test, the papers' protocol)"
             if results.get("selection") == "test" else " (held-out train classes)"))
    loss = results.get("train_loss") or {}
    if loss.get("first_step") is not None and loss.get("last_epoch_mean") is not None:
        print(f"training loss {loss['first_step']:.4f} at the first step, {loss['last_epoch_mean']:.4f} over the "
              f"last epoch")
    print(thresholds_line(results))
    tested = results.get("tested_weights")
    if tested and tested["which"] == NO_VALIDATION:
        print("WARNING: the test used the LAST weights: no validation ran, so there is no best checkpoint "
              "(fast_dev_run, limit_val_batches=0 or no checkpoint callback)")
    elif tested:
        score = "n/a" if tested["val/R@1"] is None else f"{100 * tested['val/R@1']:.2f}"
        print(f"tested weights: {results.get('best_checkpoint') or tested['checkpoint']} (val R@1 {score} at step "
              f"{tested['step']})")
    print()


def thresholds_line(results: dict) -> str:
    """``final λ 0.431 (pos 0.402, neg 0.460), final margin 0.118``: where the run's thresholds ended."""
    lam = results.get("final_lambda")
    if lam is None:
        return "final λ: n/a (this loss has no threshold)"
    detail = results.get("final_lambda_detail") or {}
    parts = [f"{k.replace('_', ' ')} {v:.3f}" for k, v in detail.items() if isinstance(v, float)]
    line = f"final λ {lam:.3f}" + (f" ({', '.join(parts)})" if parts else "")
    if results.get("final_margin") is not None:
        line += f", final margin {results['final_margin']:.3f}"
    return line
