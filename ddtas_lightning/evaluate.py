"""Evaluation entry point: ``python -m ddtas_lightning.evaluate ckpt_path=... [dataset=...] [split=test|val]``.

Rebuilds the model from the config saved in the checkpoint (``checkpoint_compat.CONFIG_KEY``), or from
``run_config=<file>`` when given (for checkpoints written before configs were saved: a run dir's
``.hydra/config.yaml`` is never picked up on its own), evaluates it on the chosen dataset and split, and
writes into its run dir (``outputs/eval/<date>_<time>/``):

- ``metrics.json``: the training run's metrics (``test/R@1``, ``test/MAP@R``, ...) plus ``per_class``
  (R@1 and MAP@R of each class's queries) for this split;
- ``inspect/gallery.png`` + ``gallery.html`` (+ ``gallery.json``): the N worst and N random queries with
  their top-k neighbours, right/wrong marked (:mod:`ddtas_lightning.inspect.gallery`);
- ``inspect/embedding_map.png``: t-SNE of the embeddings coloured by class;
- ``export/``: embeddings, labels, ids, roles and image paths as ``.npy`` and a faiss index
  (:mod:`ddtas_lightning.inspect.exports`).

The evaluation itself is :func:`ddtas_lightning.evaluation.run_evaluation`, the one ``train``'s final test calls.

A checkpoint is untrusted data (``docs/security.md``): it is opened weights-only
(:mod:`ddtas_lightning.runtime.safe_load`) and its config must pass the allow-list of
:mod:`ddtas_lightning.config.trusted_targets` before anything is instantiated from it. The outputs appear
together or not at all (staged, ``metrics.json`` moved last); SIGTERM / SIGINT stop it with exit 143 / 130
and remove the partial files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from ddtas_lightning.config.trusted_targets import check_trusted_config
from ddtas_lightning.config.validation import ConfigError, as_int, check_choice
from ddtas_lightning.runtime.atomic_output import describe_os_error, staged_outputs
from ddtas_lightning.runtime.errors import exit_code_for, root_cause
from ddtas_lightning.runtime.safe_load import load_torch_file

if TYPE_CHECKING:
    from ddtas_lightning.evaluation import Evaluation
# Lightning, torch, timm and faiss (the evaluation, the builder, checkpoint_compat) are imported in the
# functions that need them: `--help` prints at once (benchmarks/bench_startup.py).

log = logging.getLogger(__name__)


CKPT_EXPECTED = "a .ckpt file written by ddtas_lightning.train, e.g. <run dir>/checkpoints/last.ckpt"


def load_run_config(ckpt_path: Path, run_config: str | Path | None = None) -> tuple[DictConfig, dict]:
    """The checkpoint (loaded on the CPU, weights only) and the training run's config: ``run_config``
    when given, else the one stored in the checkpoint. Either is untrusted data and must pass the
    allow-list of :mod:`ddtas_lightning.config.trusted_targets` before anything is built from it. The
    run dir's ``.hydra/config.yaml`` next to a checkpoint is never read on its own (it is as untrusted as
    the checkpoint, and may not even be the config that wrote it): name it with ``run_config=``."""
    from ddtas_lightning.runtime.checkpoint_compat import CONFIG_KEY

    ckpt = load_torch_file(ckpt_path, what="ckpt_path", noun="checkpoint", expected=CKPT_EXPECTED)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path: {ckpt_path} is not a Lightning checkpoint (no 'state_dict' entry); "
                          f"expected {CKPT_EXPECTED}")
    if run_config not in (None, ""):
        source = Path(str(run_config)).expanduser()
        if not source.is_file():
            raise ConfigError(f"run_config: {source} does not exist (expected the training run's "
                              "<run dir>/.hydra/config.yaml)")
        try:
            cfg = OmegaConf.load(source)
        except Exception as e:
            raise ConfigError(f"run_config: cannot read {source}: {type(e).__name__}: {e}") from None
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"run_config: {source} is not a mapping; expected a training run's .hydra/config.yaml")
        check_trusted_config(cfg, f"run_config={source}")
        return cfg, ckpt
    saved = ckpt.get(CONFIG_KEY)
    if not isinstance(saved, dict):
        hydra_file = ckpt_path.parent.parent / ".hydra" / "config.yaml"
        beside = (f"; {hydra_file} exists, but a file next to a checkpoint is not read on its own: check it and "
                  f"pass run_config={hydra_file}") if hydra_file.is_file() else \
            "; pass the training run's config with run_config=<run dir>/.hydra/config.yaml"
        raise ConfigError(f"ckpt_path: {ckpt_path} carries no training config (checkpoint key '{CONFIG_KEY}', "
                          f"saved by every checkpoint of this framework); evaluate rebuilds the model from it{beside}")
    check_trusted_config(saved, f"checkpoint {ckpt_path}")
    return OmegaConf.create(saved), ckpt


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


INSPECT_MINIMA = {"n_worst": 0, "n_random": 0, "top_k": 1, "thumb": 16, "map_max_points": 2}


def check_eval_options(cfg: DictConfig) -> None:
    """The options of ``conf/eval.yaml`` a user sets, checked before any work (one ConfigError each)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path in (None, ""):
        raise ConfigError("ckpt_path is required: python -m ddtas_lightning.evaluate ckpt_path=<run dir>/checkpoints/"
                          "<file>.ckpt (a checkpoint written by ddtas_lightning.train)")
    from ddtas_lightning.evaluation import SPLITS

    check_choice("split", cfg.split, SPLITS)
    for key, minimum in INSPECT_MINIMA.items():
        if key in cfg.inspect:
            value = as_int(f"inspect.{key}", cfg.inspect[key], minimum)
            if key == "thumb" and value > 1024:
                raise ConfigError(f"inspect.thumb must be an integer in [16, 1024] (thumbnail pixels), got {value}")
    from ddtas_lightning.config.checks import boolean_keys, check_booleans

    # inspect.map=no is the string 'no', which reads as true: booleans must be true/false (conf/eval.yaml's keys)
    check_booleans(cfg, [k for k in boolean_keys() if k.startswith("inspect.")] + ["metrics.nmi"])


class EvaluationStopped(Exception):
    """SIGTERM / SIGINT during ``evaluate``: raised from the signal handler, so the work stops where it is
    and the staged outputs are removed."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"evaluate stopped by {signal.Signals(signum).name}; nothing was written (the partial "
                         "outputs were removed); run it again to evaluate")


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise :class:`EvaluationStopped` (the first one; later ones are ignored while
    the staged files are cleaned up); the previous handlers come back afterwards. Lightning's own SIGTERM
    handler, installed during ``trainer.test``, calls this one too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def on_signal(signum: int, frame) -> None:
        if received:
            return
        received.append(signum)
        raise EvaluationStopped(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def evaluate(cfg: DictConfig) -> dict:
    """Run the evaluation described by ``conf/eval.yaml``; returns the metrics.json payload.

    Every output is written into a staging dir inside the run dir and moved into place only when all of
    them are complete, ``metrics.json`` last: a full or read-only disk, a crash or a signal leaves no
    ``inspect/`` without ``metrics.json``, no 0-byte file and no staging dir
    (:func:`ddtas_lightning.runtime.atomic_output.staged_outputs`)."""
    import lightning.pytorch as pl

    from ddtas_lightning.evaluation import per_class_json, run_evaluation
    from ddtas_lightning.runtime.builder import build
    from ddtas_lightning.runtime.checkpoint_compat import check_checkpoint_compat
    from ddtas_lightning.runtime.run_output import quiet_third_party

    check_eval_options(cfg)
    quiet_third_party()  # Lightning's advertisements, torch deprecations raised inside Lightning
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    run_cfg, ckpt = load_run_config(ckpt_path, cfg.get("run_config"))
    run_cfg = eval_config(cfg, run_cfg)
    output_dir = Path(cfg.paths.output_dir)
    with stop_on_signals():
        pl.seed_everything(int(cfg.seed), workers=True)
        datamodule, module = build(run_cfg)
        check_checkpoint_compat(ckpt_path, module)  # weights from another model: one clear error
        trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, default_root_dir=output_dir,
                             enable_progress_bar=sys.stdout.isatty(), enable_model_summary=False)
        module.load_state_dict(ckpt["state_dict"])  # the weights only (trainer.test(ckpt_path) would restore loops)
        result = run_evaluation(trainer, module, datamodule, split=cfg.split)
        dataset = datamodule.test_set  # the evaluated split (run_evaluation points test_set at val)
        paths = list(getattr(dataset, "paths", [])) or [
            f"#{i}" for i in range(int(result.items["indices"].max()) + 1)]
        payload = {
            "task_name": "eval",
            "checkpoint": str(ckpt_path),
            "dataset": run_cfg.dataset.name,
            "split": cfg.split,
            "test": result.metrics,
            "per_class": per_class_json(result.per_class),
        }
        try:  # staged, then moved into place together, metrics.json last (runtime/atomic_output.py)
            with staged_outputs(output_dir, last=("metrics.json",)) as staging:
                written = write_inspection(cfg.inspect, staging, result, paths, module.test_metrics.backend,
                                           images=hasattr(dataset, "paths"),
                                           about={k: payload[k] for k in ("checkpoint", "dataset", "split")}
                                           | {"metrics": result.metrics})
                payload["outputs"] = {k: str(output_dir / Path(v).relative_to(staging)) for k, v in written.items()}
                (staging / "eval_config.yaml").write_text(OmegaConf.to_yaml(run_cfg))  # what was rebuilt
                (staging / "metrics.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
        except OSError as e:  # a full or read-only disk
            raise ConfigError(f"cannot write the evaluation's outputs in {output_dir}: {describe_os_error(e)}; "
                              f"nothing was kept. Free space on (or make writable) {output_dir}, or choose "
                              "another hydra.run.dir") from None
    print_eval_summary(payload, output_dir / "metrics.json")
    return payload


def write_inspection(opts: DictConfig, output_dir: Path, result: Evaluation, paths: list, backend: str,
                     images: bool = True, about: dict | None = None) -> dict[str, str]:
    """Gallery, embedding map and exports, as ``conf/eval.yaml``'s ``inspect`` asks; returns their paths.
    ``about`` (checkpoint, dataset, split, metrics) heads the gallery PNG and HTML and titles the map."""
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
                                                    thumb=int(opts.thumb), about=about))
        out["gallery_html"] = str(render_gallery_html(rows, inspect_dir / "gallery.html", about=about))
        out["gallery_json"] = str(inspect_dir / "gallery.json")
    elif opts.gallery:
        log.info("inspect.gallery: the dataset has no image files; no gallery")
    if opts.map:
        inspect_dir.mkdir(parents=True, exist_ok=True)
        q = items["is_query"]
        where = " ".join(str((about or {}).get(k)) for k in ("dataset", "split") if (about or {}).get(k))
        png, _, _ = embedding_map(items["embeddings"][q].float().cpu().numpy(), items["labels"][q].cpu().numpy(),
                                  inspect_dir / "embedding_map.png", max_points=int(opts.map_max_points),
                                  title=f"t-SNE of the {where} query embeddings" if where else "t-SNE of the embeddings")
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
    except EvaluationStopped as exc:  # exit as a shell reports the signal (143 SIGTERM, 130 SIGINT)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except Exception as exc:  # one clear line for bad input instead of a deep traceback
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"error: {root_cause(exc)}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
