"""What a run records about itself (ddtas_lightning/runtime/run_record.py, metrics.json): training CPU seconds
and passes through the model counted at the embedder (a static step: one forward and one backward of the
batch; the meta policy's extra passes show), the validation metrics of the selected checkpoint, and both
carried through a checkpoint so a resumed run reports the whole run."""

from __future__ import annotations

import json

import torch

from ddtas_lightning.runtime.run_record import ComputeMeter, ValidationHistory
from ddtas_lightning.runtime.training import train

FAST = ["trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "logger=none",
        "evaluate_before_training=false", "trainer.enable_progress_bar=false"]


def test_static_run_counts_one_forward_and_one_backward_per_step(tiny_cfg, tmp_path, one_thread):
    train(tiny_cfg(*FAST))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    steps = m["global_steps"]
    assert steps == 6 and m["selection"] == "val"
    train_passes = m["compute"]["passes"]["train"]
    assert train_passes["forward"] == train_passes["backward"] == steps
    assert train_passes["forward_images"] == train_passes["backward_images"] == steps * 8  # batch of 8
    assert m["compute"]["passes"]["validate"]["backward"] == 0
    assert m["compute"]["fit_cpu_s"] > 0 and m["compute"]["run_cpu_s"] >= m["compute"]["fit_cpu_s"] * 0.5
    assert m["compute"]["world_size"] == 1 and m["compute"]["fit_gpu_s"] is None
    # two validations (epochs 1 and 2); val_at_best is the first with the highest val/R@1
    assert m["val_at_best"]["val/R@1"] == m["best_val_R@1"]


def test_meta_step_shows_its_extra_passes(tiny_cfg, tmp_path, one_thread):
    train(tiny_cfg(*FAST, "threshold_policy=meta", "loss=soft_contrastive", "data.meta_batch_size=4",
                   "threshold_policy.mode=jvp"))
    passes = json.loads((tmp_path / "run" / "metrics.json").read_text())["compute"]["passes"]["train"]
    steps = 6
    assert passes["forward"] > steps and passes["forward_images"] >= steps * (8 + 4)  # + the meta batch
    assert passes["backward"] > steps


def test_compute_and_validation_history_travel_in_checkpoints():
    meter = ComputeMeter()
    meter.load_state_dict({"cpu_s": 5.0, "gpu_s": 0.0, "wall_s": 7.0, "passes": {"train": {"forward": 3}}})
    state = meter.state_dict()
    assert state["cpu_s"] == 5.0 and state["wall_s"] == 7.0 and state["passes"]["train"]["forward"] == 3
    history = ValidationHistory()
    history.load_state_dict({"history": [{"step": 4, "val/R@1": 0.5}, {"step": 8, "val/R@1": 0.4},
                                         {"step": 12, "val/R@1": 0.5}]})
    assert history.best()["step"] == 4  # the first best, like ModelCheckpoint(mode="max")


def test_resumed_run_reports_the_compute_before_the_checkpoint(tiny_cfg, tmp_path, one_thread):
    train(tiny_cfg(*FAST, "trainer.max_epochs=1"))
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())["compute"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ComputeMeter"))
    assert saved["passes"]["train"]["forward"] == 3 and saved["cpu_s"] > 0
    train(tiny_cfg(*FAST, "trainer.max_epochs=2", "ckpt_path=last"))
    second = json.loads((tmp_path / "run" / "metrics.json").read_text())["compute"]
    assert second["passes"]["train"]["forward"] == 6  # 3 before the checkpoint + 3 after
    assert second["fit_cpu_s"] > saved["cpu_s"] and first["fit_cpu_s"] > 0


def test_hypergrad_step_counts_its_forward_over_reverse_pass(tiny_cfg, tmp_path, one_thread):
    # torch.func.jvp's duals are functorch wrappers that forward_ad.unpack_dual does not see: counted anyway
    train(tiny_cfg(*FAST, "threshold_policy=hypergrad", "loss=soft_contrastive", "data.meta_batch_size=4",
                   "threshold_policy.meta_params=head"))
    passes = json.loads((tmp_path / "run" / "metrics.json").read_text())["compute"]["passes"]["train"]
    assert passes["jvp"] == 6  # one HVP pass per step


def test_only_forward_mode_forwards_count_as_jvp_passes():
    meter = ComputeMeter()
    meter._trainer = None  # outside a trainer: the "train" stage
    model = torch.nn.Linear(3, 2)
    meter.attach(model)
    x = torch.randn(4, 3)
    params = dict(model.named_parameters())

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).sum()

    model(x)
    torch.func.grad(loss)(params)
    assert meter.passes["train"]["forward"] == 2 and meter.passes["train"]["jvp"] == 0
    tangents = {k: torch.ones_like(v) for k, v in params.items()}
    torch.func.jvp(torch.func.grad(loss), (params,), (tangents,))
    assert meter.passes["train"]["forward"] == 3 and meter.passes["train"]["jvp"] == 1
