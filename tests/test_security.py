"""A checkpoint (and the config in it or next to it) is data, not code (docs/security.md).

- item 1: ``evaluate`` builds nothing from a stored config whose ``_target_`` (or resolver) is not on the
  allow-list of ddtas_lightning.config.trusted_targets; every ``_target_`` of conf/ is on it;
- item 2: every loader of a file a user may have been given (evaluate's and training's ``ckpt_path``,
  ``backbone.checkpoint_path``, the NSPA report's checkpoints) refuses a pickle that would run code, and
  training refuses it before the untrained evaluation;
- item 9: a run dir's ``.hydra/config.yaml`` is read only when named with ``run_config=``;
- evaluate's outputs appear together or not at all (full disk, read-only disk, SIGTERM: exit 143).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ddtas_lightning.config.trusted_targets import TRUSTED_TARGETS, is_trusted_target, untrusted_nodes
from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.evaluate import EvaluationStopped, evaluate
from ddtas_lightning.runtime.checkpoint_compat import CONFIG_KEY
from ddtas_lightning.runtime.safe_load import UnsafeFileError
from ddtas_lightning.runtime.training import train
from tests.conftest import CONF_DIR, TINY_DATA, compose_train

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.accelerator=cpu", "evaluate_before_training=false", "test_after_training=false",
        "logger=none", "data.batches_per_epoch=1", "trainer.max_epochs=1"]
QUICK_EVAL = ["accelerator=cpu", "inspect.map=false", "inspect.n_worst=2", "inspect.n_random=1", "inspect.top_k=2",
              "inspect.thumb=16"]


class Payload:
    """Unpickling it calls ``open(marker, "w")``: the file appears if the loader runs what a pickle names."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, data_dir) -> Path:
    """last.ckpt of a one-step tiny run (resnet10t, backbone.dim=16), with Hydra's .hydra/config.yaml."""
    root = tmp_path_factory.mktemp("ckpt_run")
    cfg = compose_train([*TINY_DATA, *FAST], root, data_dir)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run / "checkpoints" / "last.ckpt"


def compose_eval(overrides: list[str], out: Path, data_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="eval", overrides=[f"paths.root_dir={out}", f"paths.output_dir={out}",
                                                      f"paths.data_dir={data_dir}", *QUICK_EVAL, *overrides])


def with_config(ckpt: Path, out: Path, edit) -> Path:
    """A copy of ``ckpt`` whose stored config ``edit(config)`` changed (as a hostile sender would)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(state[CONFIG_KEY])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


# ---- item 1: the allow-list ----------------------------------------------------------------------------
def test_every_target_in_conf_is_trusted():
    targets = set()
    for path in Path(CONF_DIR).rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip().startswith(("_target_:", "- _target_:")):
                targets.add(line.split("_target_:", 1)[1].split("#", 1)[0].strip())
    assert len(targets) > 40 and {t for t in targets if not is_trusted_target(t)} == set()
    assert TRUSTED_TARGETS <= targets  # the explicit names are all in use (no stale entry)


@pytest.mark.parametrize("target", ["pathlib.Path.write_text", "os.system", "builtins.exec", "subprocess.run",
                                    "torch.optim.os.system", "pytorch_metric_learning.losses.torch.save",
                                    "torch.save", "ddtas_lightning.data.prepare.prepare", 42])
def test_untrusted_targets(target):
    assert not is_trusted_target(target)


def test_resolvers_and_nested_targets_are_walked():
    found = untrusted_nodes({
        "a": {"_target_": "torch.optim.Adam", "_args_": [{"_target_": "os.system", "_args_": ["id"]}]},
        "b": "${oc.env:AWS_SECRET_ACCESS_KEY}", "c": "${oc.select:a,${oc.env:HOME}}", "d": "${backbone.dim}",
        "e": "${now:%Y}", "paths": {"root_dir": "${oc.env:PROJECT_ROOT,${hydra:runtime.cwd}}"},
        "f": [{"_target_": "pytorch_metric_learning.distances.CosineSimilarity"}], "g": "\\${oc.env:ESCAPED}",
    })
    assert [k for k, _ in found] == ["a._args_[0]._target_", "b", "c"]


def test_checkpoint_config_with_an_untrusted_target_is_refused_and_builds_nothing(trained_ckpt, tmp_path, data_dir):
    marker = tmp_path / "written_by_the_checkpoint"

    def evil(cfg: dict) -> None:  # Path(marker).write_text("owned"), as instantiate would call it
        cfg["backbone"] = {"_target_": "pathlib.Path.write_text",
                           "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "owned"]}

    ckpt = with_config(trained_ckpt, tmp_path / "evil.ckpt", evil)
    cfg = compose_eval([f"ckpt_path={ckpt}"], tmp_path / "out", data_dir)
    with pytest.raises(ConfigError, match=r"^backbone._target_: _target_ 'pathlib.Path.write_text' in the config of "
                                          rf"checkpoint {ckpt} is not on the allow-list .* \(and 1 more: "
                                          r"backbone._args_\[0\]._target_\); refused before anything was built"):
        evaluate(cfg)
    assert not marker.exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_checkpoint_config_reading_an_environment_variable_is_refused(trained_ckpt, tmp_path, data_dir):
    ckpt = with_config(trained_ckpt, tmp_path / "env.ckpt",
                       lambda cfg: cfg["dataset"].update(name="${oc.env:AWS_SECRET_ACCESS_KEY,none}"))
    cfg = compose_eval([f"ckpt_path={ckpt}"], tmp_path / "out", data_dir)
    with pytest.raises(ConfigError, match=r"^dataset.name: interpolation .*resolver 'oc.env'"):
        evaluate(cfg)


def test_a_normal_checkpoint_evaluates_and_its_outputs_appear_together(trained_ckpt, tmp_path, data_dir):
    out = tmp_path / "out"
    payload = evaluate(compose_eval([f"ckpt_path={trained_ckpt}"], out, data_dir))
    assert json.loads((out / "metrics.json").read_text())["test"] == payload["test"]
    assert sorted(p.name for p in out.iterdir()) == ["eval_config.yaml", "export", "inspect", "metrics.json"]
    assert Path(payload["outputs"]["gallery_json"]) == out / "inspect" / "gallery.json"
    assert (out / "inspect" / "gallery.json").is_file() and (out / "export" / "gallery.faiss").is_file()


# ---- item 9: the run dir's .hydra/config.yaml only when named --------------------------------------------
@pytest.fixture
def ckpt_without_config(trained_ckpt, tmp_path) -> Path:
    """An older checkpoint (no stored config) in a run dir whose .hydra/config.yaml is the training config."""
    state = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    del state[CONFIG_KEY]
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text((trained_ckpt.parent.parent / ".hydra" / "config.yaml").read_text())
    torch.save(state, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


def test_run_dir_config_is_not_read_on_its_own(ckpt_without_config, tmp_path, data_dir):
    hydra_file = ckpt_without_config.parent.parent / ".hydra" / "config.yaml"
    cfg = compose_eval([f"ckpt_path={ckpt_without_config}"], tmp_path / "out", data_dir)
    with pytest.raises(ConfigError, match=rf"carries no training config .*; {hydra_file} exists, but a file next to "
                                          rf"a checkpoint is not read on its own: check it and pass "
                                          rf"run_config={hydra_file}"):
        evaluate(cfg)
    cfg = compose_eval([f"ckpt_path={ckpt_without_config}", f"run_config={hydra_file}"], tmp_path / "out", data_dir)
    assert evaluate(cfg)["test"]


def test_explicit_run_config_goes_through_the_allow_list(ckpt_without_config, tmp_path, data_dir):
    hydra_file = ckpt_without_config.parent.parent / ".hydra" / "config.yaml"
    evil = OmegaConf.load(hydra_file)
    evil.loss = {"_target_": "os.system", "_args_": ["touch pwned"]}
    OmegaConf.save(evil, tmp_path / "evil.yaml")
    cfg = compose_eval([f"ckpt_path={ckpt_without_config}", f"run_config={tmp_path / 'evil.yaml'}"],
                       tmp_path / "out", data_dir)
    with pytest.raises(ConfigError, match=r"^loss._target_: _target_ 'os.system' in the config of run_config="):
        evaluate(cfg)


# ---- item 2: pickles that run code, refused by every loader ---------------------------------------------
def pickle_checkpoint(trained_ckpt: Path, path: Path, marker: Path) -> Path:
    """A genuine checkpoint with one more entry whose unpickling creates ``marker``."""
    state = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    state["callbacks"] = {"evil": Payload(marker)}
    torch.save(state, path)
    return path


def test_evaluate_refuses_a_pickle_checkpoint(trained_ckpt, tmp_path, data_dir):
    marker = tmp_path / "marker"
    ckpt = pickle_checkpoint(trained_ckpt, tmp_path / "evil.ckpt", marker)
    cfg = compose_eval([f"ckpt_path={ckpt}"], tmp_path / "out", data_dir)
    with pytest.raises(UnsafeFileError, match=rf"^ckpt_path: checkpoint {ckpt} asks to construct the Python object "
                                              r"io.open when loaded.*refused"):
        evaluate(cfg)
    assert not marker.exists()


def test_training_refuses_a_pickle_checkpoint_before_the_untrained_evaluation(trained_ckpt, tmp_path, data_dir):
    marker = tmp_path / "marker"
    ckpt = pickle_checkpoint(trained_ckpt, tmp_path / "evil.ckpt", marker)
    cfg = compose_train([*TINY_DATA, *FAST, "evaluate_before_training=true", f"ckpt_path={ckpt}"], tmp_path,
                        data_dir)
    with pytest.raises(UnsafeFileError, match=r"^ckpt_path: checkpoint .*evil.ckpt asks to construct"):
        train(cfg)
    assert not marker.exists() and not (tmp_path / "run" / "untrained.json").exists()


def test_backbone_weights_that_need_a_full_unpickler_are_refused(tmp_path):
    from ddtas_lightning.models import Embedder

    marker = tmp_path / "marker"
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, weights)
    with pytest.raises(UnsafeFileError, match=rf"^backbone.checkpoint_path: weights file {weights} asks to construct "
                                              r"the Python object io.open"):
        Embedder("resnet10t", dim=8, checkpoint_path=str(weights))
    assert not marker.exists()


def test_nspa_report_refuses_a_pickle_checkpoint(trained_ckpt, tmp_path, capsys):
    from ddtas_lightning.report.nspa import main

    marker = tmp_path / "marker"
    run = tmp_path / "multirun" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text((trained_ckpt.parent.parent / ".hydra" / "config.yaml").read_text())
    ckpt = pickle_checkpoint(trained_ckpt, run / "best.ckpt", marker)
    (run / "metrics.json").write_text(json.dumps({"best_checkpoint": str(ckpt), "test": {}}))
    assert main([str(tmp_path / "multirun"), "--split", "heldout"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks to construct the Python object io.open" in err[0], err
    assert not marker.exists()


# ---- evaluate's outputs: full disk, read-only disk, SIGTERM -------------------------------------------------
@pytest.mark.parametrize("code, name", [(errno.ENOSPC, "metrics.json"), (errno.EROFS, "gallery.json")])
def test_evaluate_on_a_full_or_read_only_disk_keeps_nothing(trained_ckpt, tmp_path, data_dir, monkeypatch, code,
                                                           name):
    real = Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == name:  # the disk fills up (or turns out read-only) at this file
            raise OSError(code, os.strerror(code))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    out = tmp_path / "out"
    cfg = compose_eval([f"ckpt_path={trained_ckpt}"], out, data_dir)
    with pytest.raises(ConfigError, match=rf"^cannot write the evaluation's outputs in {out}: {os.strerror(code)} "
                                          rf"\(errno {code}, {errno.errorcode[code]}\); nothing was kept"):
        evaluate(cfg)
    assert list(out.iterdir()) == []  # no gallery.json without metrics.json, no 0-byte file, no staging dir


def test_evaluate_stopped_by_sigterm_keeps_nothing(trained_ckpt, tmp_path, data_dir, monkeypatch):
    import ddtas_lightning.inspect as inspect_pkg

    real = inspect_pkg.render_gallery_html

    def terminated(*args, **kwargs):  # SIGTERM arrives while the gallery is being written
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect_pkg, "render_gallery_html", terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with pytest.raises(EvaluationStopped, match="evaluate stopped by SIGTERM; nothing was written") as info:
        evaluate(compose_eval([f"ckpt_path={trained_ckpt}"], out, data_dir))
    assert info.value.signum == signal.SIGTERM and list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


@pytest.mark.slow  # one evaluate process (~15 s)
def test_evaluate_cli_exits_143_on_sigterm_with_one_line(trained_ckpt, tmp_path, data_dir):
    code = ("import os, signal, sys\n"
            "import ddtas_lightning.inspect as i\n"
            "real = i.render_gallery_html\n"
            "def terminated(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "i.render_gallery_html = terminated\n"
            "import runpy\n"
            "sys.argv = ['evaluate', *sys.argv[1:]]\n"
            "runpy.run_module('ddtas_lightning.evaluate', run_name='__main__')\n")  # as python -m does
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-c", code, f"ckpt_path={trained_ckpt}", f"hydra.run.dir={out}",
                           f"paths.data_dir={data_dir}", *QUICK_EVAL], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluate stopped by SIGTERM")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".hydra")) in ([], ["evaluate.log"])
