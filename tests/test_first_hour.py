"""Issue 22, a new user's first hour: plain `trainer.<flag>=` overrides, short runs that still validate (and
say which weights they tested), `debug=overfit` on fixed batches, the learned lambda's final value, a
weights-only best checkpoint with a readable name, quiet output, `debug=fdr` labelled, NSPA's loss pairing."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.sampler import PKBatchSampler
from ddtas_lightning.runtime.builder import build
from ddtas_lightning.runtime.run_end import final_thresholds
from ddtas_lightning.runtime.training import train
from tests.test_train_cli import run_cli

CKPT_NAME = re.compile(r"epoch\d{3}-step\d{6}-valR@1_\d\.\d{4}\.ckpt")


def metrics_of(cfg) -> dict:
    return json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())


def test_plain_trainer_max_steps_runs_validates_at_its_end_and_tests_the_best_checkpoint(tmp_path):
    # 20 steps inside an epoch of 40 batches: no validation in fit (check_val_every_n_epoch=4), so before
    # the fix: "best val R@1 nan", no best checkpoint, and the test silently used the last weights.
    # Through the CLI, without "+": before, `trainer.max_steps=20` failed (not in struct).
    proc = run_cli("trainer.max_steps=20", "data.batches_per_epoch=40", "trainer.accelerator=cpu",
                   "evaluate_before_training=false", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_steps"] == 20 and metrics["validated_at_end"] is True
    tested = metrics["tested_weights"]
    assert tested["which"] == "best checkpoint" and tested["step"] == 20
    assert 0.0 <= tested["val/R@1"] <= 1.0 and math.isclose(tested["val/R@1"], metrics["best_val_R@1"])
    best = Path(metrics["best_checkpoint"])
    assert best == run / tested["checkpoint"] and best.is_file() and CKPT_NAME.fullmatch(best.name), best.name
    assert best.name.startswith("epoch000-step000020-")  # the epoch of the last step, not the count of epochs
    assert f"tested weights: {best}" in proc.stdout and "best val R@1 n/a" not in proc.stdout
    # the best checkpoint is weights only (plus the run's config, for evaluate.py); last.ckpt resumes
    best_ckpt = torch.load(best, map_location="cpu", weights_only=True)
    last_ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best_ckpt and "ddtas_config" in best_ckpt and best_ckpt["state_dict"]
    assert "optimizer_states" in last_ckpt and "ddtas_config" in last_ckpt
    # quiet: Lightning's litlogger advertisement and torch's LeafSpec deprecation (raised in Lightning) are gone,
    # and the config is a short summary (the whole tree is in the run dir)
    assert "litlogger" not in proc.stderr + proc.stdout and "LeafSpec" not in proc.stderr
    summary = proc.stdout.split("== config", 1)[1].split("\n\n", 1)[0]
    assert len(summary.splitlines()) <= 10 and "groups   " in summary and "loss=ms" in summary
    assert (run / "config_tree.yaml").is_file()


def test_a_weights_only_checkpoint_cannot_be_resumed_from(tiny_cfg, one_thread):
    cfg = tiny_cfg("trainer.max_steps=3", "trainer.accelerator=cpu", "evaluate_before_training=false",
                   "trainer.check_val_every_n_epoch=1")
    train(cfg)
    best = metrics_of(cfg)["best_checkpoint"]
    with pytest.raises(ConfigError, match="weights-only checkpoint.*ckpt_path=last"):
        train(tiny_cfg(f"ckpt_path={best}", "trainer.max_steps=6", "trainer.accelerator=cpu",
                       "evaluate_before_training=false", "trainer.check_val_every_n_epoch=1"))


def test_keep_last_false_deletes_last_ckpt_after_a_finished_run(tiny_cfg, one_thread):
    cfg = tiny_cfg("trainer.max_steps=3", "trainer.accelerator=cpu", "evaluate_before_training=false",
                   "callbacks.keep_last=false")
    train(cfg)
    names = sorted(p.name for p in Path(cfg.paths.output_dir, "checkpoints").iterdir())
    assert len(names) == 1 and CKPT_NAME.fullmatch(names[0]), names  # the best only


def test_overfit_sampler_repeats_the_same_batches_every_epoch():
    labels = [c for c in range(8) for _ in range(6)]
    fixed, moving = (PKBatchSampler(labels, P=2, K=2, seed=3, fixed=f) for f in (True, False))

    def epoch(sampler, e):
        sampler.set_epoch(e)
        return [(list(b), b.seed) for b in sampler]

    assert epoch(fixed, 0) == epoch(fixed, 1) == epoch(fixed, 7)  # indices and augmentation seeds
    assert epoch(moving, 0) != epoch(moving, 1)


def test_debug_overfit_drives_the_training_loss_to_about_zero(tiny_cfg, one_thread):
    # 20 epochs of the same 3 batches; before the fix the 3 batches changed every epoch (loss 0.947 -> 0.832
    # with the default config). Tiny config: about 10 s on the 2-core CI machine.
    cfg = tiny_cfg("debug=overfit", "evaluate_before_training=false", "test_after_training=false")
    train(cfg)
    loss = metrics_of(cfg)["train_loss"]
    assert loss["first_step"] > 0.3 and loss["last_epoch_mean"] < 0.01, loss


def test_learned_lambda_final_value_is_recorded_and_printed(tiny_cfg, one_thread, capsys):
    cfg = tiny_cfg("threshold_policy=hypergrad", "data.meta_batch_size=4", "data.meta_K=2", "trainer.max_steps=3",
                   "trainer.accelerator=cpu", "evaluate_before_training=false", "test_after_training=false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    metrics = metrics_of(cfg)
    with next(Path(cfg.paths.output_dir).glob("csv/**/metrics.csv")).open() as f:
        logged = [float(r["train/lambda"]) for r in csv.DictReader(f) if r.get("train/lambda")]
    assert metrics["loss_threshold"] == 0.5 and len(logged) == 3 and logged[-1] != pytest.approx(0.5, abs=1e-4)
    # the lambda after the last step's update (the logged value is the one each step trained with)
    assert metrics["final_lambda"] == pytest.approx(logged[-1], abs=0.05) and metrics["final_lambda"] != 0.5
    assert f"final λ {metrics['final_lambda']:.3f}" in capsys.readouterr().out
    # hypergrad's forward-mode pass made torch script its jvp decompositions: that deprecation is not shown
    assert not [w for w in caught if "jit.script" in str(w.message) or "LeafSpec" in str(w.message)]


def test_final_thresholds_of_pos_neg_per_anchor_and_learned_margin():
    class Policy:
        learn_margin = True
        margin = torch.tensor(0.12)

        def __init__(self, lam):
            self.lam = lam

        def current_threshold(self):
            return self.lam

    def module(lam):
        return SimpleNamespace(policy=Policy(lam), loss_fn=SimpleNamespace(threshold=0.5))

    no_metrics = SimpleNamespace(callback_metrics={})
    pos_neg = final_thresholds(module(torch.tensor([0.4, 0.6])), no_metrics)
    assert pos_neg["final_lambda"] == pytest.approx(0.5) and pos_neg["final_lambda_detail"] == pytest.approx(
        {"pos": 0.4, "neg": 0.6}) and pos_neg["final_margin"] == pytest.approx(0.12)
    anchors = SimpleNamespace(callback_metrics={"train/lambda_anchor_mean": torch.tensor(0.42),
                                                "train/lambda_anchor_min": torch.tensor(0.3)})
    per_anchor = final_thresholds(module(torch.tensor(0.7)), anchors)
    assert per_anchor["final_lambda"] == pytest.approx(0.42)  # per-anchor lambdas: their mean
    assert per_anchor["final_lambda_detail"]["anchor_min"] == pytest.approx(0.3)
    static = final_thresholds(module(None), no_metrics)  # a policy that sets none: the loss's own
    assert static["final_lambda"] == 0.5


def test_fast_dev_run_summary_says_it_is_not_a_result(tiny_cfg, one_thread, capsys):
    cfg = tiny_cfg("debug=fdr")
    train(cfg)
    out = capsys.readouterr().out
    assert "NOT A RESULT" in out and "not a result" in out
    assert metrics_of(cfg)["fast_dev_run"] is True
    assert metrics_of(cfg)["tested_weights"]["which"] == "last (no validation)"


def test_nspa_miner_with_a_pair_loss_is_refused_naming_the_pairing(tiny_cfg):
    with pytest.raises(ConfigError, match=r"miner=nspa .*MultiSimilarityLoss.*use loss=triplet"):
        build(tiny_cfg("miner=nspa"))
    with pytest.raises(ConfigError, match="use loss=triplet"):
        build(tiny_cfg("miner=nspa_hardest", "loss=contrastive"))
    build(tiny_cfg("miner=nspa", "loss=triplet"))  # the pairing NSPA is for


def test_wandb_logger_drops_the_anonymous_warning_and_is_quiet_off_a_terminal(tiny_cfg, monkeypatch):
    import io

    from hydra.utils import instantiate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal (a log file, SLURM)
    logger = instantiate(tiny_cfg("logger=wandb").logger.wandb)
    init = logger._wandb_init
    # Lightning's anonymous=None made W&B warn "The anonymous setting has no effect" at every run
    assert "anonymous" not in init and init["settings"].quiet is True


def test_a_resume_to_more_epochs_validates_its_end_and_knows_the_earlier_best(tiny_cfg, one_thread):
    # 3 steps per epoch, validation every 4 epochs: neither run validates inside fit
    first = tiny_cfg("trainer.max_epochs=1", "trainer.accelerator=cpu", "evaluate_before_training=false",
                     "test_after_training=false")
    train(first)
    assert metrics_of(first)["val_at_best"]["step"] == 3
    again = tiny_cfg("trainer.max_epochs=2", "trainer.accelerator=cpu", "evaluate_before_training=false",
                     "ckpt_path=last")
    train(again)
    metrics = metrics_of(again)
    assert metrics["global_steps"] == 6 and metrics["validated_at_end"] is True
    tested = metrics["tested_weights"]
    # before the fix: no best checkpoint, "best val R@1 nan", the last weights tested without a word
    assert tested["which"] == "best checkpoint" and tested["step"] == 6 and 0 <= tested["val/R@1"] <= 1
    assert Path(again.paths.output_dir, tested["checkpoint"]).is_file()
