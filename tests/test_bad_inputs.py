"""The bad-input catalogue: every bad input the framework knows, what it triggers, and the message.

``CASES`` is the single list: config values, config groups, dataset layouts, corrupt images, empty
mining, checkpoints. Each case runs in-process (``train()`` on the real composed config, a loader, or a
dataset) and must raise the expected exception whose message matches the regex (naming the key or the
file and what is allowed / expected), and be an error that ``python -m ddtas_lightning.train`` prints as
one ``error: ...`` line with exit code 2 (Hydra's own composition errors: its message, exit code 1). A
few cases (``cli=True``) also run through the CLI in a subprocess.

``docs/bad_inputs.md`` is generated from ``CASES`` (``UPDATE_BAD_INPUTS_DOC=1 pytest
tests/test_bad_inputs.py -k doc``) and a test fails when it drifts. Each case's ``example`` (the message
shown in the doc) must itself match its regex, so the doc cannot show a message the code no longer gives.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.cars196 import Cars196
from ddtas_lightning.data.cub200 import CUB200
from ddtas_lightning.data.folder import Folder
from ddtas_lightning.data.image_dataset import ImageDataset
from ddtas_lightning.data.inshop import InShop
from ddtas_lightning.data.records import DatasetLayoutError, SplitRecords
from ddtas_lightning.data.sop import SOP
from ddtas_lightning.data.synthetic import Synthetic
from ddtas_lightning.evaluate import EvaluationStopped
from ddtas_lightning.miners.selection import PairSelection
from ddtas_lightning.module import NonFiniteLossError
from ddtas_lightning.report.runs import SweepError
from ddtas_lightning.runtime.builder import build
from ddtas_lightning.runtime.errors import exit_code_for
from ddtas_lightning.runtime.errors import root_cause as _root_cause
from ddtas_lightning.runtime.safe_load import UnsafeFileError
from ddtas_lightning.runtime.training import resolve_ckpt, train
from tests.conftest import CONF_DIR, TINY_DATA, compose_train
from tests.data.conftest import cars_annos, corrupt, write_image

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"
HYDRA_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)
# Whatever a case does not override: a tiny run that stops after one step, no evaluation, no files.
FAST = ["trainer.accelerator=cpu", "evaluate_before_training=false", "test_after_training=false",
        "logger=none", "callbacks=none", "data.batches_per_epoch=1", "trainer.max_epochs=1"]


@dataclass(frozen=True)
class Case:
    """One bad input. ``error=None``: handled without an error; ``run`` then asserts the outcome."""

    name: str
    category: str
    trigger: str  # what the user does (markdown)
    run: Callable[[SimpleNamespace], object]
    error: type[BaseException] | None
    match: str  # regex over the message (re.S)
    example: str  # the message (or outcome) as the doc shows it; must match ``match``
    exit: int  # CLI exit code: 2 one 'error:' line, 1 Hydra's own message, 0 no error
    cli: bool = False  # also run through the CLI subprocess


def overrides_of(ctx: SimpleNamespace, overrides: tuple[str, ...]) -> list[str]:
    """The case's overrides (``{ckpt}`` / ``{tmp}`` filled in) after TINY_DATA + FAST minus the keys it sets."""
    own = [o.format(ckpt=ctx.ckpt() if "{ckpt}" in o else "", tmp=ctx.tmp) for o in overrides]
    keys = {o.split("=", 1)[0].lstrip("+") for o in own}
    base = [o for o in [*TINY_DATA, *FAST] if o.split("=", 1)[0].lstrip("+") not in keys]
    return [*base, *own]


def config(*overrides: str) -> Callable[[SimpleNamespace], object]:
    """Run ``train()`` on the real composed config with these overrides."""

    def run(ctx: SimpleNamespace) -> object:
        return train(compose_train(overrides_of(ctx, overrides), ctx.tmp, ctx.data_dir))

    run.overrides = overrides  # type: ignore[attr-defined]
    return run


def compose_only(*overrides: str) -> Callable[[SimpleNamespace], object]:
    """Compose the config only (Hydra's own errors come from composition)."""
    return lambda ctx: compose_train(list(overrides), ctx.tmp, ctx.data_dir)


# Every config group a user selects options from (hydra/ and local/ are not user choices).
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir()
                if p.is_dir() and p.name not in ("hydra", "local", "arm") and any(p.glob("*.yaml")))


# ---- dataset trees ------------------------------------------------------------------------------
def cub_tree(root: Path, classes: int = 4, per_class: int = 3) -> Path:
    """A miniature ``CUB_200_2011`` tree (real JPEGs) under ``root``."""
    d = root / "CUB_200_2011"
    images, labels = [], []
    for c in range(1, classes + 1):
        for j in range(per_class):
            k = len(images) + 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j}.jpg"
            write_image(d / "images" / rel, seed=k)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, classes + 1)))
    return d


def cub(edit: Callable[[Path], None]) -> Callable[[SimpleNamespace], object]:
    def run(ctx: SimpleNamespace) -> object:
        d = cub_tree(ctx.tmp)
        edit(d)
        return CUB200(d).load("train")

    return run


def cars(edit: Callable[[Path], None] | None, classes: int = 3, class_names: int | None = None):
    def run(ctx: SimpleNamespace) -> object:
        from scipy.io import savemat

        root = ctx.tmp / "cars196"
        annos, names = cars_annos(classes, 2, class_names)
        for k in range(1, annos.shape[1] + 1):
            write_image(root / "car_ims" / f"{k:06d}.jpg", seed=k)
        savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
        if edit is not None:
            edit(root)
        return Cars196(root).load("train")

    return run


def sop(header: str = "image_id class_id super_class_id path", drop_test: bool = False):
    def run(ctx: SimpleNamespace) -> object:
        d = ctx.tmp / "Stanford_Online_Products"
        for split, first in (("train", 1), ("test", 3)):
            lines = [header] + [f"{i + 1} {first + i // 2} 1 bicycle_final/{split}_{i}.JPG" for i in range(4)]
            for i in range(4):
                write_image(d / "bicycle_final" / f"{split}_{i}.JPG", seed=i)
            if not (drop_test and split == "test"):
                (d / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
        return SOP(d).load("train")

    return run


def loader(make: Callable[[Path], object]) -> Callable[[SimpleNamespace], object]:
    return lambda ctx: make(ctx.tmp)


# ---- corrupt images -----------------------------------------------------------------------------
def image_set(ctx: SimpleNamespace, mode: str, bad: tuple[int, ...] = (1,)) -> ImageDataset:
    """Two classes x 3 PNGs; the items in ``bad`` overwritten with undecodable bytes."""
    paths = [write_image(ctx.tmp / "imgs" / f"c{i // 3}" / f"{i}.png", seed=i) for i in range(6)]
    for i in bad:
        corrupt(paths[i])
    return ImageDataset(SplitRecords(paths, [i // 3 for i in range(6)]), on_bad_image=mode)


def corrupt_fail(ctx: SimpleNamespace) -> object:
    return image_set(ctx, "fail")[1]


def corrupt_skip(ctx: SimpleNamespace) -> None:
    ds = image_set(ctx, "skip")
    image, label, index = ds[1]
    assert (label, index) == (0, 1) and image.shape[0] == 3  # a substitute of the same class
    assert ds.num_skipped == 1 and ds.skipped_paths == [Path(ds.paths[1])]


def corrupt_whole_class(ctx: SimpleNamespace) -> object:
    return image_set(ctx, "skip", bad=(0, 1, 2))[1]


def corrupt_verify(ctx: SimpleNamespace) -> object:
    return image_set(ctx, "fail", bad=(1, 4)).verify(num_threads=1)


# ---- empty mining -------------------------------------------------------------------------------
def empty_selection_every_loss(ctx: SimpleNamespace) -> None:
    """Every loss of conf/loss on a selection with no pair: exactly 0, with a zero, finite gradient."""
    from hydra.utils import instantiate

    emb = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    emb.requires_grad_(True)
    none = torch.zeros(4, 4, dtype=torch.bool)
    for path in sorted(Path(CONF_DIR, "loss").glob("*.yaml")):
        if path.stem == "pml":  # wraps a PML loss on embeddings, not a similarity-matrix loss (test_pml_interop)
            continue
        loss = instantiate(OmegaConf.load(path))(emb @ emb.T, PairSelection(none, none))
        (grad,) = torch.autograd.grad(loss, emb)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), path.stem


def empty_mining_training_step(ctx: SimpleNamespace) -> None:
    """miner.epsilon=-10 selects nothing: the step's loss is exactly 0, the update is taken, nothing
    is skipped as non-finite, and the zero loss and the empty mining are logged."""
    cfg = compose_train(overrides_of(ctx, ("miner=ms", "miner.epsilon=-10", "logger=csv")), ctx.tmp, ctx.data_dir)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 1 and metrics["nonfinite_skipped"] == 0
    header, row = (out / "csv" / "metrics.csv").read_text().splitlines()[:2]
    logged = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(logged["train/loss"]) == 0.0
    assert float(logged["mining/pos_pairs"]) == 0.0 and float(logged["mining/neg_pairs"]) == 0.0


# ---- checkpoints --------------------------------------------------------------------------------
def write_garbage(ctx: SimpleNamespace) -> object:
    path = ctx.tmp / "garbage.ckpt"
    path.write_bytes(b"not a checkpoint" * 8)
    return config(f"ckpt_path={path}")(ctx)


def plain_state_dict(ctx: SimpleNamespace) -> object:
    path = ctx.tmp / "weights.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, path)
    return config(f"ckpt_path={path}")(ctx)


def last_absent(ctx: SimpleNamespace) -> None:
    cfg = compose_train(overrides_of(ctx, ("ckpt_path=last",)), ctx.tmp, ctx.data_dir)
    assert resolve_ckpt(cfg, ctx.tmp / "fresh") is None  # starts from scratch


# ---- issue 16: run dirs, full disks, NaN, leaking symlinks, image modes, misleading metrics ---------------
def not_loadable_weights(kind: str) -> Callable[[SimpleNamespace], object]:
    """``backbone.checkpoint_path`` = a text file, or the state dict of another architecture."""

    def run(ctx: SimpleNamespace) -> object:
        path = ctx.tmp / "weights.pth"
        if kind == "text":
            path.write_text("these are not weights\n")
        else:
            import timm

            torch.save(timm.create_model("resnet14t", num_classes=0).state_dict(), path)
        return config(f"backbone.checkpoint_path={path}")(ctx)

    return run


def folder_with_symlinked_class(ctx: SimpleNamespace) -> object:
    """``ln -s <root> <root>/c_link``: a class folder holding every other class's images."""
    root = ctx.tmp / "imgs"
    for i in range(6):
        write_image(root / f"c{i // 3}" / f"{i}.png", seed=i)
    os.symlink(root, root / "c_link")
    return Folder(root, split=0.5).load("train")


def sop_test_reuses_train_image(ctx: SimpleNamespace) -> object:
    d = ctx.tmp / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    for split, first in (("train", 1), ("test", 3)):
        for i in range(4):
            write_image(d / "bicycle_final" / f"{split}_{i}.JPG", seed=i)
        lines = [header] + [f"{i + 1} {first + i // 2} 1 bicycle_final/{split}_{i}.JPG" for i in range(4)]
        if split == "test":  # a test class holding a train image
            lines.append("5 4 1 bicycle_final/train_0.JPG")
        (d / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return SOP(d).load("test")


def run_dir_in_use(ctx: SimpleNamespace) -> object:
    from ddtas_lightning.runtime.run_dir import acquire_lock, release_lock

    fd = acquire_lock(ctx.tmp)  # the first run, alive
    try:
        return acquire_lock(ctx.tmp)
    finally:
        release_lock(fd)


def read_only_run_dir(ctx: SimpleNamespace) -> object:
    import errno
    from unittest import mock

    from ddtas_lightning.runtime import run_dir

    erofs = OSError(errno.EROFS, os.strerror(errno.EROFS))
    with mock.patch.object(run_dir.tempfile, "NamedTemporaryFile", side_effect=erofs):
        return config()(ctx)


def disk_full_checkpoint(ctx: SimpleNamespace) -> object:
    """A save that hits ENOSPC: one error, and the previous last.ckpt intact (tests/test_run_faults.py runs
    the same inside training)."""
    import errno
    from unittest import mock

    from ddtas_lightning.runtime import checkpointing

    path = ctx.tmp / "checkpoints" / "last.ckpt"
    checkpointing.atomic_torch_save({"step": 1}, path)
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        with mock.patch.object(checkpointing._RecordingFile, "write", side_effect=enospc):
            checkpointing.atomic_torch_save({"step": 2}, path)
    finally:
        assert torch.load(path, weights_only=True)["step"] == 1 and list(path.parent.iterdir()) == [path]


def sixteen_bit_png(ctx: SimpleNamespace) -> None:
    import numpy as np
    from PIL import Image

    from ddtas_lightning.data.image_dataset import open_rgb

    v = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(v).save(ctx.tmp / "deep.png")
    got = np.asarray(open_rgb(ctx.tmp / "deep.png"))[..., 0]
    assert Image.open(ctx.tmp / "deep.png").mode == "I;16"
    np.testing.assert_array_equal(got, np.rint(v / 257.0).astype(np.uint8))  # scaled: v * 255 / 65535


def recall_k_above_gallery(ctx: SimpleNamespace) -> None:
    """R@1000 on a 36-image test split is 100% by construction: a warning in the log, once per split."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ddtas_lightning.runtime.metrics_checks")
    logger.addHandler(handler)
    try:
        config("metrics.recall_ks=[1,1000]", "evaluate_before_training=true")(ctx)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    test = [m for m in messages if " on the test split, " in m]
    assert len(test) == 1 and test[0].startswith("metrics.recall_ks: R@1000 on the test split, whose queries each "
                                                 "rank only 35 gallery items"), messages
    assert len(messages) == len({m.split(" split,")[0] for m in messages})  # once per split


# ---- issue 21: degenerate eval splits, loosely read values, ignored combinations, misspelt added keys -------
def folder_eval_split(kind: str) -> Callable[[SimpleNamespace], object]:
    """``dataset=folder``: 6 train classes x 3 images, and a test split of one class (6 images) or of 6
    classes of one image each; refused when the data module is set up, before any training."""

    def run(ctx: SimpleNamespace) -> object:
        root = ctx.tmp / "imgs"
        for c in range(6):
            for j in range(3):
                write_image(root / f"a{c}" / f"{j}.png", seed=10 * c + j, size=32)
        test = [("t0", j) for j in range(6)] if kind == "one-class" else [(f"t{c}", 0) for c in range(6)]
        for k, (name, j) in enumerate(test):
            write_image(root / name / f"{j}.png", seed=100 + k, size=32)
        fraction = round(6 / (6 + len({n for n, _ in test})), 3)  # the a* classes train
        own = ("dataset=folder", f"dataset.source.root={root}", f"dataset.source.split={fraction}",
               "dataset.image_size=32", "transform=simple")
        base = [o for o in overrides_of(ctx, own) if not o.startswith("dataset.source.")]
        return train(compose_train([*base, f"dataset.source.root={root}", f"dataset.source.split={fraction}"],
                                   ctx.tmp, ctx.data_dir))

    return run


def with_hydra_mode(*overrides: str) -> Callable[[SimpleNamespace], object]:
    """``train()`` on the composed config with Hydra's own config set as in ``python -m ddtas_lightning.train``
    without ``-m`` (RUN mode)."""

    def run(ctx: SimpleNamespace) -> object:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", return_hydra_config=True, overrides=[
                f"paths.root_dir={ctx.tmp}", f"paths.output_dir={ctx.tmp / 'run'}", f"paths.data_dir={ctx.data_dir}",
                "hydra.mode=RUN", *overrides_of(ctx, overrides)])
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            return train(cfg)
        finally:
            HydraConfig.instance().cfg = None  # type: ignore[assignment]

    run.overrides = overrides  # type: ignore[attr-defined]
    return run


def tpe_space(param: str) -> Callable[[SimpleNamespace], object]:
    """The TPE sweeper's search space of ``hydra.sweeper.params`` (what ``-m hparams_search=...`` builds first)."""

    def run(ctx: SimpleNamespace) -> object:
        from hydra_plugins.ddtas_tpe_sweeper.tpe_sweeper import TPESweeper

        key, value = param.split("=", 1)
        return TPESweeper(n_trials=1, params={key: value})._space([])

    return run


def cached(*overrides: str) -> Callable[[SimpleNamespace], object]:
    """``dataset=cached_features backbone=mlp transform=none`` (on the synthetic images) with ``overrides``."""

    def run(ctx: SimpleNamespace) -> object:
        own = ("dataset=cached_features", "backbone=mlp", "transform=none", *overrides)
        base = [o for o in overrides_of(ctx, own) if not o.startswith(("dataset.source.", "dataset.image_size",
                                                                        "backbone.model_name"))]
        return train(compose_train([*base, *(o for o in overrides if o.lstrip("+").startswith("dataset.source."))],
                                   ctx.tmp, ctx.data_dir))

    return run


def cached_stage_out_of_range(ctx: SimpleNamespace) -> object:
    """``dataset.source.stages=[9]`` on resnet10t (stages 0-4): refused when the frozen backbone is built, before
    any image is read."""
    from ddtas_lightning.data.cached_features import CachedFeatures

    source = CachedFeatures(root=str(ctx.tmp / "features"), images={"name": "x", "source": {}},
                            backbone={"_target_": "ddtas_lightning.models.Embedder", "model_name": "resnet10t",
                                      "dim": 8}, transform={}, stages=[9])
    return source.model()


# ---- issue 21 (untrusted files, outputs on a full disk, evaluate's options): docs/security.md --------------
def eval_cfg(ctx: SimpleNamespace, ckpt: Path | None, *overrides: str):
    from tests.test_security import compose_eval

    return compose_eval([*([f"ckpt_path={ckpt}"] if ckpt else []), *overrides], ctx.tmp / "eval", ctx.data_dir)


def evaluate_with(*overrides: str, ckpt: bool = True) -> Callable[[SimpleNamespace], object]:
    """``python -m ddtas_lightning.evaluate`` in-process on the catalogue's trained checkpoint."""

    def run(ctx: SimpleNamespace) -> object:
        from ddtas_lightning.evaluate import evaluate

        return evaluate(eval_cfg(ctx, ctx.ckpt() if ckpt else None, *overrides))

    return run


def hostile_checkpoint(kind: str) -> Callable[[SimpleNamespace], object]:
    """The trained checkpoint as a hostile sender would pass it on: a stored config naming a _target_ that
    writes a file (or reading an environment variable), a pickle that runs code, or no stored config at
    all (the run dir's .hydra/config.yaml beside it is not read on its own). Nothing may run."""

    def run(ctx: SimpleNamespace) -> object:
        from ddtas_lightning.evaluate import evaluate
        from tests.test_security import pickle_checkpoint, with_config

        marker = ctx.tmp / "marker"
        ckpt = ctx.tmp / "run" / "checkpoints" / "sent.ckpt"
        if kind == "target":
            with_config(ctx.ckpt(), ckpt, lambda c: c.update(backbone={
                "_target_": "pathlib.Path.write_text",
                "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "owned"]}))
        elif kind == "env":
            with_config(ctx.ckpt(), ckpt, lambda c: c["dataset"].update(name="${oc.env:AWS_SECRET_ACCESS_KEY}"))
        elif kind == "no-config":  # an older checkpoint, with a .hydra/config.yaml beside it
            state = torch.load(ctx.ckpt(), weights_only=True)
            del state["ddtas_config"]
            ckpt.parent.mkdir(parents=True)
            torch.save(state, ckpt)
            (ctx.tmp / "run" / ".hydra").mkdir()
            (ctx.tmp / "run" / ".hydra" / "config.yaml").write_text("seed: 0\n")
        else:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            pickle_checkpoint(ctx.ckpt(), ckpt, marker)
        try:
            if kind == "pickle-train":
                return config(f"ckpt_path={ckpt}", "evaluate_before_training=true")(ctx)
            return evaluate(eval_cfg(ctx, ckpt))
        finally:
            assert not marker.exists() and not (ctx.tmp / "run" / "untrained.json").exists()

    return run


def pickle_backbone_weights(ctx: SimpleNamespace) -> object:
    from tests.test_security import Payload

    path = ctx.tmp / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(ctx.tmp / "marker")}, path)
    try:
        return config(f"backbone.checkpoint_path={path}")(ctx)
    finally:
        assert not (ctx.tmp / "marker").exists()


def hostile_archive(kind: str) -> Callable[[SimpleNamespace], object]:
    """``python -m ddtas_lightning.data.prepare cub200 <archive>`` on a tar with a symlink member, a zip bomb (at
    a 1 MiB cap) or a truncated .tgz; nothing is installed."""

    def run(ctx: SimpleNamespace) -> object:
        import tarfile
        import zipfile

        from ddtas_lightning.data.prepare import Limits, prepare

        d = cub_tree(ctx.tmp / "download", classes=2, per_class=2)
        archive, limits = ctx.tmp / {"link": "cub.tar", "bomb": "cub.zip", "truncated": "cub.tgz"}[kind], None
        if kind == "link":
            with tarfile.open(archive, "w") as t:
                t.add(d, arcname="CUB_200_2011")
                info = tarfile.TarInfo("CUB_200_2011/images/escape")
                info.type, info.linkname = tarfile.SYMTYPE, "../../../.."
                t.addfile(info)
        elif kind == "bomb":
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(d.rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(d.parent).as_posix())
                z.writestr("CUB_200_2011/zeros.bin", b"\0" * (2 * 2**20))
            limits = Limits(max_bytes=2**20)
        else:
            with tarfile.open(archive, "w:gz") as t:
                t.add(d, arcname="CUB_200_2011")
            archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        try:
            return prepare("cub200", [archive], ctx.tmp / "data", limits=limits)
        finally:
            assert not (ctx.tmp / "data" / "CUB_200_2011").exists()

    return run


def index_path_outside_root(ctx: SimpleNamespace) -> object:
    d = cub_tree(ctx.tmp / "ds")
    write_image(ctx.tmp / "outside" / "secret.jpg", seed=99)  # exists: without the check it would be read
    lines = (d / "images.txt").read_text().splitlines()
    lines[2] = "3 ../../../outside/secret.jpg"
    (d / "images.txt").write_text("\n".join(lines) + "\n")
    return CUB200(d).load("train")


def bad_feature_cache(kind: str) -> Callable[[SimpleNamespace], object]:
    def run(ctx: SimpleNamespace) -> object:
        from tests.data.test_untrusted_inputs import feature_cache

        src, _ = feature_cache(ctx.tmp, **{"truncated": dict(truncate=True), "short-labels": dict(labels=9),
                                           "nan": dict(nan=True)}[kind])
        return src.load("train")

    return run


def failing_write(code: int, name: str):
    """``Path.write_text`` raising OSError(code) for files called ``name``: a disk that fills up (ENOSPC) or
    turns out read-only (EROFS) there. The tests run as root, for whom chmod does not stop a write."""
    from unittest import mock

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            raise OSError(code, os.strerror(code))
        return real(self, *args, **kwargs)

    return mock.patch.object(Path, "write_text", write_text)


def disk_error(command: str, code: int) -> Callable[[SimpleNamespace], object]:
    """``command``'s outputs on a disk that fails with ``code``: one error naming the folder; nothing left
    there (no 0-byte report.md, no gallery.json without metrics.json, no .tmp.npz, no staging dir)."""

    def run(ctx: SimpleNamespace) -> object:
        import numpy as np

        out = ctx.tmp / "out"
        try:
            if command == "evaluate":
                with failing_write(code, "metrics.json" if code == errno.ENOSPC else "gallery.json"):
                    from ddtas_lightning.evaluate import evaluate

                    return evaluate(_eval_into(ctx, out))
            if command == "compare":
                from ddtas_lightning.compare import run as compare
                from tests.test_compare import make_sweep

                sweep = make_sweep(ctx.tmp / "sweeps", failed=False)
                with failing_write(code, "report.md"):
                    return compare([sweep], out)
            if command == "study":
                from ddtas_lightning.report.study import settings, write_report
                from tests.test_study import GRID, LEARNED, make_setting

                make_setting(ctx.tmp / "study", "synth_100", GRID, LEARNED)
                with failing_write(code, "report.md"):
                    return write_report(settings(ctx.tmp / "study"), out)
            if command == "feature-cache":
                from unittest import mock

                from ddtas_lightning.data import cached_features as cf

                def savez(file, **arrays):  # part of the file written, then the disk is full
                    Path(file).write_bytes(b"PK\x03\x04")
                    raise OSError(code, os.strerror(code))

                out.mkdir()
                with mock.patch.object(cf.np, "savez", savez):
                    return cf.write_cache(out / cf.FEATURES, out / cf.MANIFEST, {}, np.zeros((2, 3), np.float32),
                                          np.zeros(2), np.zeros(2))
            from unittest import mock

            from ddtas_lightning.data import synthetic

            def write_tree(params, tmp, num_workers):
                (tmp / "images").mkdir(parents=True)
                (tmp / "images" / "half.png").write_bytes(b"\x89PNG")
                raise OSError(code, os.strerror(code))

            with mock.patch.object(synthetic, "write_tree", write_tree):
                return synthetic.Synthetic(out, num_classes=4, images_per_class=2).load("train")
        finally:
            assert not out.exists() or [p.name for p in out.iterdir()] == [], list(out.iterdir())

    return run


def _eval_into(ctx: SimpleNamespace, out: Path):
    from tests.test_security import compose_eval

    return compose_eval([f"ckpt_path={ctx.ckpt()}"], out, ctx.data_dir)


def evaluate_sigterm(ctx: SimpleNamespace) -> object:
    """SIGTERM while evaluate writes its gallery: it stops, removes what it had written, exits 143."""
    from unittest import mock

    import ddtas_lightning.inspect as inspect_pkg
    from ddtas_lightning.evaluate import evaluate

    real = inspect_pkg.render_gallery_html

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    out = ctx.tmp / "out"
    try:
        with mock.patch.object(inspect_pkg, "render_gallery_html", terminated):
            return evaluate(_eval_into(ctx, out))
    finally:
        assert [p.name for p in out.iterdir()] == []


C, E, L = "config value", "config group", "dataset layout"
POLICY = "threshold_policy=meta"
CASES = [
    # ---- Hydra: groups and keys ----
    *[Case(f"unknown-option-{group}", E, f"`{group}=nope`", compose_only(f"{group}=nope"), MissingConfigException,
           rf"Could not find '{group}/nope'.*Available options in '{group}':.*{first}",
           f"In 'train': Could not find '{group}/nope' / Available options in '{group}': {first}, ...", 1)
      for group in GROUPS for first in [sorted(Path(CONF_DIR, group).glob("*.yaml"))[0].stem]],
    # `arm` (sweep arms) exists only inside experiment=threshold_grid's defaults list
    Case("unknown-option-arm", E, "`experiment=threshold_grid arm=nope`",
         compose_only("experiment=threshold_grid", "arm=nope"), MissingConfigException,
         r"Could not find 'arm/nope'.*Available options in 'arm':.*at_asms",
         "In 'experiment/threshold_grid': Could not find 'arm/nope' / Available options in 'arm': at_asms, ...", 1),
    Case("unknown-key", E, "`data.batchsize=8` (a key that does not exist)", config("data.batchsize=8"),
         ConfigCompositionException, r"Could not override 'data.batchsize'",
         "Could not override 'data.batchsize'. To append to your config use +data.batchsize=8 ...", 1),
    Case("override-syntax", E, "`data.K=[` (not an override)", config("data.K=["), OverrideParseException,
         r"no viable alternative at input '\['",
         "Error parsing override 'data.K=[' / no viable alternative at input '['", 1),
    Case("missing-mandatory", C, "`backbone=timm` without `backbone.model_name`", config("backbone.model_name=???"),
         ConfigError, r"backbone.model_name has no value \('\?\?\?'\); set it",
         "backbone.model_name has no value ('???'); set it on the command line, e.g. backbone.model_name=<value>", 2),
    # ---- top-level, data.*, metrics.*, optimizer, module, trainer ----
    Case("seed", C, "`seed=abc`", config("seed=abc"), ConfigError, r"seed must be an integer >= 0, got 'abc'",
         "seed must be an integer >= 0, got 'abc'", 2),
    Case("batch-K", C, "`data.K=1`", config("data.K=1"), ConfigError,
         r"data.K \(images per class in a batch\) must be >= 2, got 1",
         "data.K (images per class in a batch) must be >= 2, got 1", 2),
    Case("batch-size-not-multiple", C, "`data.batch_size=10 data.K=4`", config("data.batch_size=10", "data.K=4"),
         ConfigError, r"data.batch_size=10 must be a multiple of data.K=4 with at least 2 classes \(e.g. 8\)",
         "data.batch_size=10 must be a multiple of data.K=4 with at least 2 classes (e.g. 8)", 2),
    Case("batch-size-not-int", C, "`data.batch_size=8.5`", config("data.batch_size=8.5"), ConfigError,
         r"data.batch_size must be an integer >= 1, got 8.5", "data.batch_size must be an integer >= 1, got 8.5", 2),
    Case("batch-more-classes-than-train", C, "`data.batch_size=32 data.K=2` on 4 train classes",
         config("data.batch_size=32", "data.K=2"), ConfigError,
         r"data.batch_size=32 / data.K=2 = 16 classes per batch, but the train split has only 4 classes",
         "data.batch_size=32 / data.K=2 = 16 classes per batch, but the train split has only 4 classes; "
         "use at most 4 classes per batch (a smaller batch size or a larger K)", 2, cli=True),
    Case("val-fraction-range", C, "`data.val_fraction=1.5`", config("data.val_fraction=1.5"), ConfigError,
         r"data.val_fraction must be a number in \[0.0, 1.0\), got 1.5",
         "data.val_fraction must be a number in [0.0, 1.0), got 1.5", 2),
    Case("val-fraction-empty-side", C, "`data.val_fraction=0.05` (rounds to 0 of 6 classes)",
         config("data.val_fraction=0.05"), ConfigError,
         r"data.val_fraction=0.05 leaves 0 of 6 train classes for validation; use a fraction",
         "data.val_fraction=0.05 leaves 0 of 6 train classes for validation; use a fraction giving at least "
         "1 class to each side, data.val_folds=k, or data.selection=test (the papers' protocol: select on the "
         "test classes)", 2),
    Case("val-fraction-zero", C, "`data.val_fraction=0` (the old spelling of test-set selection)",
         config("data.val_fraction=0"), ConfigError,
         r"data.val_fraction=0 leaves 0 of 6 train classes for validation",
         "data.val_fraction=0 leaves 0 of 6 train classes for validation; use a fraction giving at least "
         "1 class to each side, data.val_folds=k, or data.selection=test (the papers' protocol: select on the "
         "test classes)", 2),
    Case("selection-choice", C, "`data.selection=train`", config("data.selection=train"), ConfigError,
         r"data.selection must be one of \('val', 'test'\), got 'train'",
         "data.selection must be one of ('val', 'test'), got 'train'", 2),
    Case("val-folds-too-many", C, "`data.val_folds=7` on 6 train classes", config("data.val_folds=7"),
         ConfigError, r"data.val_folds=7 must be an integer in \[2, 6\]",
         "data.val_folds=7 must be an integer in [2, 6] (the train split has 6 classes) or null", 2),
    Case("val-fold-outside", C, "`data.val_folds=3 data.val_fold=3`",
         config("data.val_folds=3", "data.val_fold=3"), ConfigError,
         r"data.val_fold=3 must be an integer in \[0, 2\]",
         "data.val_fold=3 must be an integer in [0, 2] (data.val_folds=3)", 2),
    Case("on-bad-image", C, "`data.on_bad_image=ignore`", config("data.on_bad_image=ignore"), ConfigError,
         r"data.on_bad_image must be one of \('fail', 'skip'\), got 'ignore'",
         "data.on_bad_image must be one of ('fail', 'skip'), got 'ignore'", 2),
    Case("batches-per-epoch", C, "`data.batches_per_epoch=0`", config("data.batches_per_epoch=0"), ConfigError,
         r"data.batches_per_epoch \(null: one pass over the train images\) must be an integer >= 1, got 0",
         "data.batches_per_epoch (null: one pass over the train images) must be an integer >= 1, got 0", 2),
    Case("eval-batch-size", C, "`data.eval_batch_size=0`", config("data.eval_batch_size=0"), ConfigError,
         r"data.eval_batch_size must be an integer >= 1, got 0", "data.eval_batch_size must be an integer >= 1, got 0", 2),
    Case("num-workers", C, "`data.num_workers=-1`", config("data.num_workers=-1"), ConfigError,
         r"data.num_workers must be an integer >= 0, got -1", "data.num_workers must be an integer >= 0, got -1", 2),
    Case("meta-batch-shape", C, f"`{POLICY} data.meta_batch_size=5 data.meta_K=2`",
         config(POLICY, "data.meta_batch_size=5", "data.meta_K=2"), ConfigError,
         r"data.meta_batch_size=5 must be a multiple of data.meta_K=2 with at least 2 classes",
         "data.meta_batch_size=5 must be a multiple of data.meta_K=2 with at least 2 classes (e.g. 4)", 2),
    Case("meta-batch-more-classes-than-train", C, f"`{POLICY} data.meta_batch_size=12` on 4 train classes",
         config(POLICY, "data.meta_batch_size=12", "data.meta_K=2"), ConfigError,
         r"data.meta_batch_size=12 / data.meta_K=2 = 6 classes per batch, but the train split has only 4",
         "data.meta_batch_size=12 / data.meta_K=2 = 6 classes per batch, but the train split has only 4 classes; "
         "use at most 4 classes per batch (a smaller batch size or a larger K)", 2),
    Case("recall-ks", C, "`metrics.recall_ks=[0]`", config("metrics.recall_ks=[0]"), ConfigError,
         r"metrics.recall_ks must be a non-empty list of integers >= 1, got \[0\]",
         "metrics.recall_ks must be a non-empty list of integers >= 1, got [0]", 2),
    Case("knn-backend", C, "`metrics.knn_backend=annoy`", config("metrics.knn_backend=annoy"), ConfigError,
         r"metrics.knn_backend must be one of \('torch', 'faiss'\), got 'annoy'",
         "metrics.knn_backend must be one of ('torch', 'faiss'), got 'annoy'", 2),
    Case("optimizer-lr", C, "`optimizer.lr=-1`", config("optimizer.lr=-1"), ConfigError,
         r"optimizer.lr must be a number >= 0.0, got -1", "optimizer.lr must be a number >= 0.0, got -1", 2),
    Case("optimizer-weight-decay", C, "`optimizer.weight_decay=-0.1`", config("optimizer.weight_decay=-0.1"),
         ConfigError, r"optimizer.weight_decay must be a number >= 0.0, got -0.1",
         "optimizer.weight_decay must be a number >= 0.0, got -0.1", 2),
    Case("max-nonfinite-steps", C, "`module.max_nonfinite_steps=0`", config("module.max_nonfinite_steps=0"),
         ConfigError, r"module.max_nonfinite_steps must be an integer >= 1, got 0",
         "module.max_nonfinite_steps must be an integer >= 1, got 0", 2),
    Case("trainer-precision", C, "`trainer.precision=15`", config("trainer.precision=15"), ValueError,
         r"Precision '?15'? is invalid. Allowed precision values: \(.*'16-mixed'.*'32-true'",
         "Precision 15 is invalid. Allowed precision values: ('16-true', '16-mixed', 'bf16-true', 'bf16-mixed', "
         "'32-true', '64-true', ...)", 2),
    Case("trainer-accelerator", C, "`trainer.accelerator=foo`", config("trainer.accelerator=foo"), ValueError,
         r"invalid accelerator name: `accelerator='foo'`. Available names are: .*cpu",
         "You selected an invalid accelerator name: `accelerator='foo'`. Available names are: auto, tpu, cuda, "
         "mps, cpu.", 2),
    *([Case("trainer-gpu-without-cuda", C, "`trainer=gpu` on a machine without CUDA", config("trainer.accelerator=gpu"),
            ConfigError, r"trainer.accelerator=gpu but no CUDA device is available; use trainer=cpu",
            "trainer.accelerator=gpu but no CUDA device is available; use trainer=cpu or trainer.accelerator=auto",
            2)] if not torch.cuda.is_available() else []),
    Case("seed-negative", C, "`seed=-1`", config("seed=-1"), ConfigError, r"seed must be an integer >= 0, got -1",
         "seed must be an integer >= 0, got -1", 2),
    Case("recall-ks-not-a-list", C, "`metrics.recall_ks=5`", config("metrics.recall_ks=5"), ConfigError,
         r"metrics.recall_ks must be a non-empty list of integers >= 1, got 5 \(e.g. metrics.recall_ks=\[5\]",
         "metrics.recall_ks must be a non-empty list of integers >= 1, got 5 (e.g. metrics.recall_ks=[5] for one K)", 2),
    Case("max-epochs-not-int", C, "`trainer.max_epochs=1.5`", config("trainer.max_epochs=1.5"), ConfigError,
         r"trainer.max_epochs must be an integer >= -1, got 1.5", "trainer.max_epochs must be an integer >= -1, got 1.5",
         2),
    Case("image-size", C, "`dataset.image_size=0`", config("dataset.image_size=0"), ConfigError,
         r"dataset.image_size must be an integer >= 1, got 0", "dataset.image_size must be an integer >= 1, got 0", 2),
    Case("small-classes", C, "`data.small_classes=never`", config("data.small_classes=never"), ConfigError,
         r"data.small_classes must be one of \('replace', 'exclude'\), got 'never'",
         "data.small_classes must be one of ('replace', 'exclude'), got 'never'", 2),
    *[Case(f"nan-{key.replace('.', '-').replace('_', '-')}", C, f"`{' '.join(pre)} {key}={bad}`".replace("` ", "`"),
           config(*pre, f"{key}={bad}"), ConfigError,
           rf"{re.escape(key)} must be a number, got {bad} \(NaN and infinity are not allowed\)",
           f"{key} must be a number, got {bad} (NaN and infinity are not allowed)", 2)
      for pre, key, bad in (((), "miner.epsilon", "nan"), (("miner=asms",), "miner.margin", "nan"),
                            ((POLICY,), "threshold_policy.inner_lr", "nan"), ((POLICY,), "threshold_policy.lr", "nan"),
                            ((POLICY,), "threshold_policy.init", "nan"), ((), "loss.threshold", "inf"),
                            ((), "optimizer.lr", "inf"))],
    # ---- dataset / transform / backbone options ----
    Case("synthetic-background", C, "`dataset.source.background=striped`",
         config("dataset.source.background=striped"), ConfigError,
         r"dataset.source.background must be one of \('gradient', 'plain'\), got 'striped'",
         "dataset.source.background must be one of ('gradient', 'plain'), got 'striped'", 2),
    Case("synthetic-size", C, "`dataset.source.num_classes=1`", config("dataset.source.num_classes=1"), ValueError,
         r"Synthetic needs num_classes >= 2, images_per_class >= 2 and image_size >= 8; got 1",
         "Synthetic needs num_classes >= 2, images_per_class >= 2 and image_size >= 8; got 1, 6, 32", 2),
    Case("train-classes-range", C, "`+dataset.source.train_classes=12` on the 12-class synthetic set (cub200, cars196: `dataset.source.train_classes=N`)",
         config("+dataset.source.train_classes=12"), ConfigError,
         r"dataset.source.train_classes=12 must be between 1 and 11 \(12 classes in .*classes.txt\)",
         "dataset.source.train_classes=12 must be between 1 and 11 (12 classes in <root>/CUB_200_2011/classes.txt)", 2),
    Case("transform-resize", C, "`transform=imagenet transform.resize=16` (image_size 32)",
         config("transform=imagenet", "transform.resize=16"), ValueError,
         r"transform.resize: resize=16 must be >= image_size=32",
         "transform.resize: resize=16 must be >= image_size=32", 2),
    Case("backbone-dim", C, "`backbone.dim=0`", config("backbone.dim=0"), ConfigError,
         r"backbone.dim must be an integer >= 1, got 0", "backbone.dim must be an integer >= 1, got 0", 2),
    Case("backbone-pooling", C, "`backbone.pooling=sum`", config("backbone.pooling=sum"), ConfigError,
         r"backbone.pooling must be one of \('avg', 'max', 'avg\+max'\), got 'sum'",
         "backbone.pooling must be one of ('avg', 'max', 'avg+max'), got 'sum'", 2),
    Case("backbone-model-name", C, "`backbone.model_name=no_such_net`", config("backbone.model_name=no_such_net"),
         ValueError, r"backbone.model_name 'no_such_net' is not a timm model",
         "backbone.model_name 'no_such_net' is not a timm model (see timm.list_models())", 2),
    Case("backbone-checkpoint-path", C, "`backbone.checkpoint_path=/nonexistent/w.pth`",
         config("backbone.checkpoint_path=/nonexistent/w.pth"), FileNotFoundError,
         r"backbone.checkpoint_path: weights file /nonexistent/w.pth does not exist",
         "backbone.checkpoint_path: weights file /nonexistent/w.pth does not exist (expected a local "
         ".pth/.safetensors state dict for the timm model)", 2),
    Case("backbone-checkpoint-text-file", C, "`backbone.checkpoint_path=` a text file",
         not_loadable_weights("text"), ConfigError,
         r"backbone.checkpoint_path: cannot load .*weights.pth into the timm model 'resnet10t' \(.*\); expected a "
         r".pth/.safetensors state dict of that architecture",
         "backbone.checkpoint_path: cannot load <path>/weights.pth into the timm model 'resnet10t' (UnpicklingError: "
         "...); expected a .pth/.safetensors state dict of that architecture (or set backbone.model_name to the one "
         "the weights are for)", 2),
    Case("backbone-checkpoint-other-arch", C, "`backbone.checkpoint_path=` resnet14t weights for `resnet10t`",
         not_loadable_weights("arch"), ConfigError,
         r"backbone.checkpoint_path: cannot load .*weights.pth into the timm model 'resnet10t' \(RuntimeError: "
         r"Error\(s\) in loading state_dict",
         "backbone.checkpoint_path: cannot load <path>/weights.pth into the timm model 'resnet10t' (RuntimeError: "
         "Error(s) in loading state_dict for ResNet: Unexpected key(s) in state_dict: ...); expected a "
         ".pth/.safetensors state dict of that architecture (or set backbone.model_name to the one the weights "
         "are for)", 2),
    # ---- loss / miner options ----
    Case("loss-threshold", C, "`loss.threshold=abc`", config("loss.threshold=abc"), ConfigError,
         r"loss.threshold must be a number, got 'abc'", "loss.threshold must be a number, got 'abc'", 2),
    Case("loss-scale", C, "`loss.scale_neg=0` (ms, soft_contrastive, binomial)", config("loss.scale_neg=0"),
         ConfigError, r"loss.scale_neg must be a number > 0.0, got 0", "loss.scale_neg must be a number > 0.0, got 0", 2),
    Case("loss-distance", C, "`loss=triplet loss.distance=manhattan`", config("loss=triplet", "loss.distance=manhattan"),
         ConfigError, r"loss.distance must be one of \('cosine', 'euclidean'\), got 'manhattan'",
         "loss.distance must be one of ('cosine', 'euclidean'), got 'manhattan'", 2),
    Case("loss-squared-cosine", C, "`loss=triplet loss.distance=cosine loss.squared=true`",
         config("loss=triplet", "loss.distance=cosine", "loss.squared=true"), ConfigError,
         r"loss.squared=true needs loss.distance=euclidean, got loss.distance=cosine",
         "loss.squared=true needs loss.distance=euclidean, got loss.distance=cosine", 2),
    Case("miner-distance", C, "`miner=semi_hard miner.distance=manhattan` (also random_hard, batch_hard, nspa)",
         config("miner=semi_hard", "miner.distance=manhattan"), ConfigError,
         r"miner.distance must be one of \('cosine', 'euclidean'\), got 'manhattan'",
         "miner.distance must be one of ('cosine', 'euclidean'), got 'manhattan'", 2, cli=True),
    Case("miner-select", C, "`miner=random_hard miner.select=some`", config("miner=random_hard", "miner.select=some"),
         ConfigError, r"miner.select must be one of \('all', 'random'\), got 'some'",
         "miner.select must be one of ('all', 'random'), got 'some'", 2),
    Case("miner-nspa-draw", C, "`miner=nspa miner.draw=epoch` (likewise `miner.pairs`, `miner.on_empty`)",
         config("miner=nspa", "miner.draw=epoch"), ConfigError,
         r"miner.draw must be one of \('pair', 'batch'\), got 'epoch'",
         "miner.draw must be one of ('pair', 'batch'), got 'epoch'", 2),
    Case("miner-count-neg-margin", C, "`miner=at_asms miner.count_neg_margin=m/100`",
         config("miner=at_asms", "miner.count_neg_margin=m/100"), ConfigError,
         r"miner.count_neg_margin must be one of \('m', 'm/10'\), got 'm/100'",
         "miner.count_neg_margin must be one of ('m', 'm/10'), got 'm/100'", 2),
    # ---- threshold policy ----
    *[Case(f"policy-{key.replace('_', '-')}", C, f"`{POLICY} threshold_policy.{key}={bad}`",
           config(POLICY, f"threshold_policy.{key}={bad}"), ConfigError,
           rf"threshold_policy.{key} must be one of \({re.escape(allowed)}\), got '{bad}'",
           f"threshold_policy.{key} must be one of ({allowed}), got '{bad}'", 2)
      for key, bad, allowed in (("mode", "fast", "'exact', 'jvp'"),
                                ("granularity", "per_pair", "'scalar', 'pos_neg', 'per_anchor'"),
                                ("step_rule", "sgd", "'adam', 'sign'"),
                                ("exact_impl", "hvp", "'identity', 'double_backward'"))],
    Case("policy-min-above-max", C, f"`{POLICY} threshold_policy.min=0.8 threshold_policy.max=0.4`",
         config(POLICY, "threshold_policy.min=0.8", "threshold_policy.max=0.4"), ValueError,
         r"threshold_policy.min \(0.8\) must be <= threshold_policy.max \(0.4\)",
         "threshold_policy.min (0.8) must be <= threshold_policy.max (0.4)", 2),
    Case("policy-init-outside-bounds", C, f"`{POLICY} threshold_policy.init=0.95`",
         config(POLICY, "threshold_policy.init=0.95"), ValueError,
         r"initial lambda \[?0.95\]? lies outside \[threshold_policy.min, threshold_policy.max\] = \[0.3, 0.9\]",
         "initial lambda 0.95 lies outside [threshold_policy.min, threshold_policy.max] = [0.3, 0.9]; set init "
         "or the bounds", 2),
    Case("policy-init-from-loss-threshold", C, f"`{POLICY} loss.threshold=0.95` (init=null: starts at loss.threshold)",
         config(POLICY, "loss.threshold=0.95"), ConfigError,
         r"loss.threshold=0.95 is the initial lambda \(threshold_policy.init=null\) but lies outside "
         r"\[threshold_policy.min, threshold_policy.max\] = \[0.3, 0.9\]",
         "loss.threshold=0.95 is the initial lambda (threshold_policy.init=null) but lies outside "
         "[threshold_policy.min, threshold_policy.max] = [0.3, 0.9]; set threshold_policy.init or the bounds", 2),
    Case("policy-init-shape", C, f"`{POLICY} threshold_policy.init=[0.5,0.6]` (granularity scalar)",
         config(POLICY, "threshold_policy.init=[0.5,0.6]"), ValueError,
         r"threshold_policy.init must be a number for granularity='scalar'",
         "threshold_policy.init must be a number for granularity='scalar', got [0.5, 0.6]", 2),
    Case("policy-inner-lr", C, f"`{POLICY} threshold_policy.inner_lr=0`", config(POLICY, "threshold_policy.inner_lr=0"),
         ValueError, r"threshold_policy.inner_lr must be > 0 and lr >= 0, got 0",
         "threshold_policy.inner_lr must be > 0 and lr >= 0, got 0, 0.001", 2),
    # ---- dataset layouts (the loaders; dataset=<name> dataset.source.root=... in a run) ----
    Case("cub-root-missing", L, "`dataset=cub200` with no tree at `dataset.source.root`",
         loader(lambda t: CUB200(t / "nowhere").load("train")), DatasetLayoutError,
         r"CUB-200-2011 root .* does not exist; expected layout: CUB_200_2011/\{images.txt",
         "CUB-200-2011 root <root> does not exist; expected layout: CUB_200_2011/{images.txt ('<image_id> "
         "<class_dir>/<file>'), image_class_labels.txt ..., classes.txt ..., images/<class_dir>/<file>}", 2),
    Case("cub-no-images-txt", L, "CUB root without `images.txt`", loader(lambda t: CUB200(t).load("train")),
         DatasetLayoutError, r"no images.txt in .* or .*CUB_200_2011; expected layout: CUB_200_2011/",
         "no images.txt in <root> or <root>/CUB_200_2011; expected layout: CUB_200_2011/{...}", 2),
    Case("cub-file-missing", L, "CUB tree without `classes.txt`", cub(lambda d: (d / "classes.txt").unlink()),
         DatasetLayoutError, r"classes.txt is missing; expected layout: CUB_200_2011/",
         "<root>/CUB_200_2011/classes.txt is missing; expected layout: CUB_200_2011/{...}", 2),
    Case("cub-image-missing", L, "an image listed in `images.txt` is not on disk",
         cub(lambda d: (d / "images" / "002.Bird_2" / "Bird_2_0.jpg").unlink()), DatasetLayoutError,
         r"1 of 12 images listed in .*images.txt are missing: .*Bird_2_0.jpg; expected layout",
         "1 of 12 images listed in <root>/images.txt are missing: <root>/images/002.Bird_2/Bird_2_0.jpg; "
         "expected layout: ...", 2),
    Case("cub-label-out-of-range", L, "`image_class_labels.txt` uses a class id not in `classes.txt`",
         cub(lambda d: (d / "image_class_labels.txt").write_text(
             (d / "image_class_labels.txt").read_text().replace("12 4", "12 7"))), DatasetLayoutError,
         r"image_class_labels.txt uses class ids \[7\] that are not in .*classes.txt",
         "<root>/image_class_labels.txt uses class ids [7] that are not in <root>/classes.txt; expected every "
         "class id to be listed in classes.txt", 2),
    Case("cub-malformed-line", L, "a line of `images.txt` is not `<id> <path>`",
         cub(lambda d: (d / "images.txt").write_text((d / "images.txt").read_text() + "thirteen x.jpg\n")),
         DatasetLayoutError, r"images.txt line 13 is 'thirteen x.jpg'; expected '<id> <name>'",
         "<root>/images.txt line 13 is 'thirteen x.jpg'; expected '<id> <name>' (...)", 2),
    Case("cars-root-missing", L, "`dataset=cars196` with no tree", loader(lambda t: Cars196(t / "nowhere").load("train")),
         DatasetLayoutError, r"Cars196 root .* does not exist; expected layout: <root>/\{cars_annos.mat",
         "Cars196 root <root> does not exist; expected layout: <root>/{cars_annos.mat (struct array "
         "'annotations' ...), car_ims/000001.jpg ...}", 2),
    Case("cars-annos-missing", L, "Cars root without `cars_annos.mat`", cars(lambda r: (r / "cars_annos.mat").unlink()),
         DatasetLayoutError, r"cars_annos.mat is missing; expected layout",
         "<root>/cars_annos.mat is missing; expected layout: <root>/{cars_annos.mat ..., car_ims/...}", 2),
    Case("cars-label-out-of-range", L, "an annotation's class id beyond `class_names`", cars(None, 4, class_names=3),
         DatasetLayoutError, r"annotations use class ids \[4\] outside 1..3",
         "<root>/cars_annos.mat: annotations use class ids [4] outside 1..3 (the length of 'class_names')", 2),
    Case("sop-root-missing", L, "`dataset=sop` with no tree", loader(lambda t: SOP(t / "nowhere").load("train")),
         DatasetLayoutError, r"SOP root .* does not exist; expected layout: Stanford_Online_Products/",
         "SOP root <root> does not exist; expected layout: Stanford_Online_Products/{Ebay_train.txt, "
         "Ebay_test.txt ...}", 2),
    Case("sop-ebay-test-missing", L, "SOP tree without `Ebay_test.txt`", sop(drop_test=True), DatasetLayoutError,
         r"Ebay_test.txt is missing; expected layout", "<root>/Ebay_test.txt is missing; expected layout: ...", 2),
    Case("sop-bad-header", L, "`Ebay_train.txt` without its header line", sop(header="id class path"),
         DatasetLayoutError, r"Ebay_train.txt starts with 'id class path'; expected the header "
         r"'image_id class_id super_class_id path'",
         "<root>/Ebay_train.txt starts with 'id class path'; expected the header 'image_id class_id "
         "super_class_id path' (...)", 2),
    Case("inshop-root-missing", L, "`dataset=inshop` with no tree", loader(lambda t: InShop(t / "nowhere").load("train")),
         DatasetLayoutError, r"In-Shop root .* does not exist; expected layout",
         "In-Shop root <root> does not exist; expected layout: <root>/{list_eval_partition.txt or "
         "Eval/list_eval_partition.txt ...}", 2),
    Case("inshop-partition-missing", L, "In-Shop root without `list_eval_partition.txt`",
         loader(lambda t: InShop(t).load("train")), DatasetLayoutError,
         r"no list_eval_partition.txt in .* or .*Eval; expected layout",
         "no list_eval_partition.txt in <root> or <root>/Eval; expected layout: ...", 2),
    Case("folder-root-missing", L, "`dataset=folder` with no tree", loader(lambda t: Folder(t / "nowhere").load("train")),
         DatasetLayoutError, r"image folder root .* does not exist; expected layout: <root>/<class_name>/",
         "image folder root <root> does not exist; expected layout: <root>/<class_name>/<image>.{jpg,png,...}", 2),
    Case("synthetic-foreign-tree", L, "`dataset=synthetic` whose root holds a real `CUB_200_2011`",
         loader(lambda t: (cub_tree(t), Synthetic(t, num_classes=4, images_per_class=2).load("train"))),
         DatasetLayoutError, r"CUB_200_2011 exists but has no .*: it is not a synthetic tree .* will not be overwritten",
         "<root>/CUB_200_2011 exists but has no synthetic_manifest.json: it is not a synthetic tree (the real "
         "CUB-200-2011?) and will not be overwritten; point the synthetic dataset's root elsewhere", 2),
    Case("folder-symlinked-class", L, "`ln -s <root> <root>/c_link` in a `dataset=folder` tree",
         folder_with_symlinked_class, DatasetLayoutError,
         r": image .*0.png is listed for two classes, as .*c0/0.png \(class 0\) and as .*c_link/c0/0.png "
         r"\(class 2\); expected each image file in one class",
         "<root>: image <root>/c0/0.png is listed for two classes, as <root>/c0/0.png (class 0) and as "
         "<root>/c_link/c0/0.png (class 2); expected each image file in one class (a symlinked folder or a "
         "duplicated entry?)", 2),
    Case("sop-test-reuses-train-image", L, "an `Ebay_test.txt` line naming a train image",
         sop_test_reuses_train_image, DatasetLayoutError,
         r"image .*train_0.JPG is listed in both the train split \(.*Ebay_train.txt\) and the test split",
         "image <root>/bicycle_final/train_0.JPG is listed in both the train split (<root>/Ebay_train.txt) and "
         "the test split (<root>/Ebay_test.txt); expected disjoint splits (a test image seen in training inflates "
         "every test metric)", 2),
    # ---- corrupt images ----
    Case("corrupt-image-fail", "corrupt image", "an undecodable image, `data.on_bad_image=fail` (default)",
         corrupt_fail, DatasetLayoutError,
         r"cannot read image .*1.png \(item 1, class 0\): .*Expected an existing, readable image file.*"
         r"set data.on_bad_image=skip",
         "cannot read image <root>/c0/1.png (item 1, class 0): UnidentifiedImageError: ... Expected an existing, "
         "readable image file (...); re-extract the dataset or set data.on_bad_image=skip to substitute another "
         "image of the same class", 2),
    Case("corrupt-image-skip", "corrupt image", "an undecodable image, `data.on_bad_image=skip`", corrupt_skip, None,
         r"substituted", "not an error: a readable image of the same class is substituted, the file is logged "
         "once as a warning and counted (`ImageDataset.num_skipped`)", 0),
    Case("corrupt-image-whole-class", "corrupt image", "every image of a class undecodable, `data.on_bad_image=skip`",
         corrupt_whole_class, DatasetLayoutError,
         r"cannot read image .*1.png .* and no image of its class 0 is readable \(3 listed",
         "cannot read image <root>/c0/1.png (...) and no image of its class 0 is readable (3 listed, e.g. "
         "<root>/c0/0.png); expected at least one readable image per class", 2),
    Case("corrupt-image-verify", "corrupt image", "`ImageDataset.verify()` on a set with 2 undecodable files",
         corrupt_verify, DatasetLayoutError,
         r"2 of 6 images are unreadable: .*1.png .*4.png .*set data.on_bad_image=skip",
         "2 of 6 images are unreadable: <root>/c0/1.png (...); <root>/c1/4.png (...). Expected readable image "
         "files; re-extract the dataset or set data.on_bad_image=skip", 2),
    Case("image-16-bit", "image mode", "a 16-bit PNG (mode `I;16`; also `I`, `F`, `CMYK`, `LA`, `P`)",
         sixteen_bit_png, None, r"scaled",
         "not an error: scaled to 8 bits from its full range (`round(v * 255 / 65535)`; PIL's own conversion "
         "clipped 99.6% of the pixels to 255), see `ddtas_lightning.data.image_dataset.to_rgb8`", 0),
    # ---- empty mining ----
    Case("empty-selection-every-loss", "empty mining", "every `loss=` on a selection with no pair",
         empty_selection_every_loss, None, r"exactly 0",
         "not an error: the loss is exactly 0 with a zero, finite gradient (never NaN)", 0),
    Case("empty-mining-training-step", "empty mining", "a miner that selects nothing (`miner.epsilon=-10`)",
         empty_mining_training_step, None, r"exactly 0",
         "not an error: train/loss is logged as exactly 0, mining/pos_pairs = mining/neg_pairs = 0, the "
         "optimiser step is taken, nothing counted as non-finite", 0),
    # ---- checkpoints ----
    Case("ckpt-missing", "checkpoint", "`ckpt_path=/nonexistent/last.ckpt`", config("ckpt_path=/nonexistent/last.ckpt"),
         ConfigError, r"ckpt_path: checkpoint /nonexistent/last.ckpt does not exist \(expected a .ckpt file, 'last'",
         "ckpt_path: checkpoint /nonexistent/last.ckpt does not exist (expected a .ckpt file, 'last' for "
         "<run dir>/checkpoints/last.ckpt, or null)", 2),
    Case("ckpt-directory", "checkpoint", "`ckpt_path=<a directory>`", config("ckpt_path={tmp}"), ConfigError,
         r"ckpt_path: checkpoint .* is a directory, not a checkpoint file",
         "ckpt_path: checkpoint <dir> is a directory, not a checkpoint file (expected a .ckpt file, ...)", 2),
    Case("ckpt-last-absent", "checkpoint", "`ckpt_path=last` with no `<run dir>/checkpoints/last.ckpt`",
         last_absent, None, r"from scratch", "not an error: the run starts from scratch", 0),
    Case("ckpt-unreadable", "checkpoint", "`ckpt_path=` a file that is not a checkpoint", write_garbage, ConfigError,
         r"ckpt_path: cannot read checkpoint .*: .*expected a .ckpt file written by this framework",
         "ckpt_path: cannot read checkpoint <path>: UnpicklingError: ...; expected a .ckpt file written by this "
         "framework (e.g. <run dir>/checkpoints/last.ckpt)", 2),
    Case("ckpt-plain-state-dict", "checkpoint", "`ckpt_path=` backbone weights (a plain state dict)", plain_state_dict,
         ConfigError, r"ckpt_path: .* is not a Lightning checkpoint \(no 'state_dict' entry\).*"
         r"backbone.checkpoint_path",
         "ckpt_path: <path> is not a Lightning checkpoint (no 'state_dict' entry); ckpt_path resumes a run of this "
         "framework. To start from backbone weights use backbone.checkpoint_path instead", 2),
    Case("ckpt-other-backbone-dim", "checkpoint", "resume a `backbone.dim=16` run with `backbone.dim=32`",
         config("ckpt_path={ckpt}", "backbone.dim=32"), ConfigError,
         # train(): the state_dict check names the shapes too; the CLI's run-dir guard (before Hydra rewrites
         # .hydra/) stops at the config comparison: both name the differing value
         r"ckpt_path: checkpoint .*last.ckpt was written under another config: .*config values that differ: "
         r"backbone.dim: 16 in the checkpoint's run, 32 here",
         "ckpt_path: checkpoint <run>/checkpoints/last.ckpt was written under another config: its state_dict does "
         "not match the model built now from config group(s) backbone (2 shape mismatches: model.head.bias: (16,) "
         "in the checkpoint, (32,) here, model.head.weight: (16, 512) in the checkpoint, (32, 512) here); config "
         "values that differ: backbone.dim: 16 in the checkpoint's run, 32 here. Resume with the config of the "
         "run that wrote it, or start a new run without ckpt_path", 2, cli=True),
    Case("ckpt-static-into-meta", "checkpoint", f"resume a `threshold_policy=static` run with `{POLICY}`",
         config("ckpt_path={ckpt}", POLICY), ConfigError,
         r"written under another config: .* from config group\(s\) threshold_policy \(6 missing from the "
         r"checkpoint: policy.exp_avg, .*config values that differ: threshold_policy._target_: "
         r"'ddtas_lightning.policies.StaticThreshold' in the checkpoint's run, 'ddtas_lightning.policies.MetaThreshold'",
         "ckpt_path: checkpoint <run>/checkpoints/last.ckpt was written under another config: its state_dict does "
         "not match the model built now from config group(s) threshold_policy (6 missing from the checkpoint: "
         "policy.exp_avg, policy.exp_avg_sq, policy.initialized, policy.lam, policy.meta_lam (and 1 more)); config "
         "values that differ: threshold_policy._target_: 'ddtas_lightning.policies.StaticThreshold' in the "
         "checkpoint's run, 'ddtas_lightning.policies.MetaThreshold' here; ... Resume with the config of the run "
         "that wrote it, or start a new run without ckpt_path", 2),
    Case("ckpt-other-backbone", "checkpoint", "resume a `resnet10t` run with `backbone.model_name=resnet14t`",
         config("ckpt_path={ckpt}", "backbone.model_name=resnet14t"), ConfigError,
         r"from config group\(s\) backbone \(.*\d+ missing from the checkpoint: model.backbone.*\(and \d+ more\)",
         "ckpt_path: checkpoint <run>/checkpoints/last.ckpt was written under another config: its state_dict does "
         "not match the model built now from config group(s) backbone (3 shape mismatches: ...; 15 missing from "
         "the checkpoint: model.backbone.layer1.1.bn1.bias, ... (and 10 more)); config values that differ: "
         "backbone.model_name: 'resnet10t' in the checkpoint's run, 'resnet14t' here. ...", 2),
    Case("ckpt-changed-config", "checkpoint", "resume with `ckpt_path=last optimizer=sgd` (the same model; through the CLI refused before `.hydra/` is rewritten)",
         config("ckpt_path={ckpt}", "optimizer=sgd"), ConfigError,
         r"ckpt_path: checkpoint .*last.ckpt was written under another config: config values that differ: "
         r"optimizer._target_: 'torch.optim.Adam' in the checkpoint's run, 'torch.optim.SGD' here",
         "ckpt_path: checkpoint <run>/checkpoints/last.ckpt was written under another config: config values that "
         "differ: optimizer._target_: 'torch.optim.Adam' in the checkpoint's run, 'torch.optim.SGD' here; "
         "optimizer.lr: ... Resume with the config of the run that wrote it (a resume may change only where it "
         "writes, how long it trains, the hardware and the loader processes), or start a new run without "
         "ckpt_path", 2),
    # ---- the run dir ----
    Case("run-dir-in-use", "run dir", "a second run in the run dir of a live one (`hydra.run.dir=D` twice)",
         run_dir_in_use, ConfigError,
         r"hydra.run.dir: .* is in use by another run \(pid \d+ on .* holds .*\.run\.lock\)",
         "hydra.run.dir: <run> is in use by another run (pid 1234 on <host> holds <run>/.run.lock); two runs in "
         "one dir would overwrite each other's logs and checkpoints. Wait for it to end, or choose another "
         "hydra.run.dir (the default name is unique per start)", 2),
    Case("run-dir-read-only", "run dir", "a read-only run dir (EROFS)", read_only_run_dir, ConfigError,
         r"paths.output_dir: cannot write to .*run \(Read-only file system\); the run needs a writable directory",
         "paths.output_dir: cannot write to <root>/run (Read-only file system); the run needs a writable directory for "
         "its logs and checkpoints: choose another hydra.run.dir (or free space)", 2),
    Case("checkpoint-disk-full", "run dir", "the disk fills up during a checkpoint save (ENOSPC)",
         disk_full_checkpoint, ConfigError,
         r"cannot write checkpoint .*last.ckpt: No space left on device \(errno 28, ENOSPC\); the previous "
         r".*last.ckpt is kept",
         "cannot write checkpoint <run>/checkpoints/last.ckpt: No space left on device (errno 28, ENOSPC); the "
         "previous <run>/checkpoints/last.ckpt is kept. Free space on (or make writable) <run>/checkpoints, or "
         "choose another hydra.run.dir; the run can be resumed from its last checkpoint with ckpt_path=last", 2),
    # ---- metrics ----
    Case("recall-k-above-gallery", "metric", "`metrics.recall_ks=[1,1000]` on a 36-image test split",
         recall_k_above_gallery, None, r"warning",
         "not an error: R@1000 is computed (100% by construction) and one warning per split says so in the log: "
         "`metrics.recall_ks: R@1000 on the test split, whose queries each rank only 35 gallery items: R@K = 100% "
         "by construction for K >= 35 and says nothing about the model; use K < 35`", 0),
    # ---- issue 21: degenerate eval splits, loosely read values, ignored combinations, misspelt added keys ----
    Case("eval-split-one-class", "eval split", "a test split with one class (`dataset=folder`, 6 images of one "
         "test class)", folder_eval_split("one-class"), ConfigError,
         r"the test split has 1 class with 6 images per class \(6 images\): R@1, MAP@R and NMI would be 1.0 by "
         r"construction .*retrieval metrics need >= 2 classes and at least one class with >= 2 images",
         "the test split has 1 class with 6 images per class (6 images): R@1, MAP@R and NMI would be 1.0 by "
         "construction (every neighbour is of the query's class); retrieval metrics need >= 2 classes and at least "
         "one class with >= 2 images. Check the dataset's classes and splits (dataset.source.*)", 2),
    Case("eval-split-one-image-per-class", "eval split", "test classes of one image each (`dataset=folder`, 6 "
         "test classes x 1 image; the validation split is checked alike)", folder_eval_split("singletons"),
         ConfigError,
         r"the test split has 6 classes with 1 image per class \(6 images\): no query has a relevant gallery "
         r"item \(R@1 and MAP@R would be NaN, NMI 1.0\); retrieval metrics need >= 2 classes",
         "the test split has 6 classes with 1 image per class (6 images): no query has a relevant gallery item (R@1 "
         "and MAP@R would be NaN, NMI 1.0); retrieval metrics need >= 2 classes and at least one class with >= 2 "
         "images. Check the dataset's classes and splits (dataset.source.*)", 2),
    Case("all-updates-skipped", "training", "every update non-finite in a run shorter than "
         "`module.max_nonfinite_steps` (NaN images from the first batch, 1 step, limit 10); metrics.json is "
         "written with `\"status\": \"not_trained\"` and no test metrics",
         config("+callbacks.nan._target_=tests.test_nonfinite.NaNImagesFrom", "+callbacks.nan.batch=0",
                "module.max_nonfinite_steps=10"), NonFiniteLossError,
         r"every training update was skipped: 1 non-finite losses/gradients and 0 optimiser updates .*no test "
         r"evaluation",
         "every training update was skipped: 1 non-finite losses/gradients and 0 optimiser updates (the run ended "
         "before module.max_nonfinite_steps=10 in a row stopped it); the model is the untrained one, so no test "
         "evaluation. Lower optimizer.lr or check the data", 3,
         cli=True),
    *[Case(f"boolean-{key.replace('.', '-').replace('_', '-')}", C, f"`{key}={bad}`", config(f"{key}={bad}"),
           ConfigError, rf"{re.escape(key)} must be true or false, got '{bad}' \('{bad}' is a string",
           f"{key} must be true or false, got '{bad}' ('{bad}' is a string, and any non-empty string reads as true)",
           2) for key, bad in (("evaluate_before_training", "no"), ("metrics.nmi", "off"),
                               ("test_after_training", "yes"), ("data.persistent_workers", "0n"))],
    Case("val-folds-with-test-selection", C, "`data.val_folds=4 data.selection=test` (the folds would be ignored)",
         config("data.val_folds=4", "data.selection=test"), ConfigError,
         r"data.val_folds=4 is ignored with data.selection=test",
         "data.val_folds=4 is ignored with data.selection=test (validation on the test split, the papers' protocol: "
         "no validation classes are held out); drop data.val_folds, or keep it with data.selection=val", 2),
    Case("val-fold-without-folds", C, "`data.val_fold=2` without `data.val_folds` (ignored)",
         config("data.val_fold=2"), ConfigError, r"data.val_fold=2 is ignored without data.val_folds",
         "data.val_fold=2 is ignored without data.val_folds (folds of the train classes); set data.val_folds=k "
         "(e.g. data.val_folds=4), or drop data.val_fold", 2),
    Case("sweep-recipe-without-m", C, "`hparams_search=threshold_tpe` without `-m` (one plain run, no search)",
         with_hydra_mode("hparams_search=threshold_tpe"), ConfigError,
         r"hparams_search=threshold_tpe is a sweep .* but this is a single run: add -m",
         "hparams_search=threshold_tpe is a sweep (an Optuna study of hydra.sweeper.n_trials runs), but this is a "
         "single run: add -m (python -m ddtas_lightning.train -m hparams_search=threshold_tpe ...); without -m "
         "Hydra ignores the sweeper and would make one plain run with the recipe's defaults", 2, cli=True),
    Case("misspelt-added-key-data", C, "`+data.batchsize=8` (a misspelt key added with `+`)",
         config("+data.batchsize=8"), ConfigError,
         r"data.batchsize is not an option of DMLDataModule; did you mean data.batch_size\? its options: .*K, "
         r"batch_size",
         "data.batchsize is not an option of DMLDataModule; did you mean data.batch_size? its options: K, "
         "batch_size, batches_per_epoch, eval_batch_size, meta_K, ...", 2, cli=True),
    Case("misspelt-added-key-optimizer", C, "`+optimizer.lrr=0.1` (any `_target_` group: loss, miner, "
         "threshold_policy, scheduler, trainer, dataset.source, transform)", config("+optimizer.lrr=0.1"),
         ConfigError, r"optimizer.lrr is not an option of torch.optim.Adam; did you mean optimizer.lr\? its "
         r"options: .*weight_decay",
         "optimizer.lrr is not an option of torch.optim.Adam; did you mean optimizer.lr? its options: amsgrad, "
         "betas, capturable, ..., lr, maximize, weight_decay", 2),
    Case("cpu-precision-16", C, "`trainer.precision=16-true` on a CPU", config("trainer.precision=16-true"),
         ConfigError, r"trainer.precision=16-true on the CPU \(trainer.accelerator=cpu\): float16 weights on a "
         r"CPU give NaN embeddings; on a CPU use one of 32-true, 64-true, bf16-mixed",
         "trainer.precision=16-true on the CPU (trainer.accelerator=cpu): float16 weights on a CPU give NaN "
         "embeddings; on a CPU use one of 32-true, 64-true, bf16-mixed (default 32-true), or run on a GPU", 2),
    Case("tpe-interval-low-above-high", "sweeper", "`-m hparams_search=threshold_tpe` with "
         "`hydra.sweeper.params.loss.threshold='interval(0.9, 0.1)'`", tpe_space("loss.threshold=interval(0.9, 0.1)"),
         ConfigError, r"hydra.sweeper.params.loss.threshold: interval\(0.9, 0.1\) has low > high; write "
         r"interval\(0.1, 0.9\)",
         "hydra.sweeper.params.loss.threshold: interval(0.9, 0.1) has low > high; write interval(0.1, 0.9)", 2),
    Case("cached-stages-out-of-range", C, "`dataset=cached_features dataset.source.stages=[9]` (resnet: 0-4)",
         cached_stage_out_of_range, ConfigError,
         r"dataset.source.stages=\[9\]: resnet10t has stages 0 \(stem\) to 4, so \[9\] is not one of them",
         "dataset.source.stages=[9]: resnet10t has stages 0 (stem) to 4, so [9] is not one of them; use indices in "
         "0..4 (e.g. [1, 2, 3, 4] for a resnet's layers)", 2),
    Case("cached-misspelt-key", C, "`dataset=cached_features +dataset.source.stagez=[1]`",
         cached("+dataset.source.stagez=[1]"), ConfigError,
         r"dataset.source.stagez is not an option of ddtas_lightning.data.cached_features.CachedFeatures; did you "
         r"mean dataset.source.stages\?",
         "dataset.source.stagez is not an option of ddtas_lightning.data.cached_features.CachedFeatures; did you "
         "mean dataset.source.stages? its options: backbone, backbone_seed, batch_size, ..., stages, ...", 2),
    # ---- issue 21: untrusted files (docs/security.md) ----
    Case("ckpt-config-untrusted-target", "untrusted file", "`evaluate ckpt_path=` a checkpoint whose stored config "
         "builds `_target_: pathlib.Path.write_text` (any `_target_` off the allow-list)",
         hostile_checkpoint("target"), ConfigError,
         r"^backbone._target_: _target_ 'pathlib.Path.write_text' in the config of checkpoint .*sent.ckpt is not on "
         r"the allow-list .*refused before anything was built",
         "backbone._target_: _target_ 'pathlib.Path.write_text' in the config of checkpoint <run>/checkpoints/sent.ckpt is "
         "not on the "
         "allow-list of what a config from a file may build (and 1 more: backbone._args_[0]._target_); refused "
         "before anything was built (ddtas_lightning.config.trusted_targets: ...). A checkpoint is data: evaluate "
         "only files whose config you have checked, or pass run_config=<a config you trust>", 2),
    Case("ckpt-config-env-resolver", "untrusted file", "`evaluate ckpt_path=` a checkpoint whose stored config "
         "reads `${oc.env:AWS_SECRET_ACCESS_KEY}`", hostile_checkpoint("env"), ConfigError,
         r"^dataset.name: interpolation '\$\{oc.env:AWS_SECRET_ACCESS_KEY\}' \(resolver 'oc.env'\) in the config "
         r"of checkpoint .* is not on the allow-list",
         "dataset.name: interpolation '${oc.env:AWS_SECRET_ACCESS_KEY}' (resolver 'oc.env') in the config of "
         "checkpoint <path> is not on the allow-list of what a config from a file may build; refused before "
         "anything was built (...)", 2),
    Case("ckpt-without-config", "untrusted file", "`evaluate ckpt_path=` an older checkpoint without a stored "
         "config, `.hydra/config.yaml` beside its run dir", hostile_checkpoint("no-config"), ConfigError,
         r"carries no training config .*config.yaml exists, but a file next to a checkpoint is not read on its "
         r"own: check it and pass run_config=.*config.yaml",
         "ckpt_path: <run>/checkpoints/sent.ckpt carries no training config (checkpoint key 'ddtas_config', saved "
         "by every checkpoint of this framework); evaluate rebuilds the model from it; <run>/.hydra/config.yaml "
         "exists, but a file next to a checkpoint is not read on its own: check it and pass "
         "run_config=<run>/.hydra/config.yaml", 2),
    *[Case(f"ckpt-pickle-{where}", "untrusted file", f"`{cmd} ckpt_path=` a checkpoint holding a pickled object "
           "(`__reduce__` calling `open`)", hostile_checkpoint(f"pickle-{where}"), UnsafeFileError,
           r"^ckpt_path: checkpoint .*sent.ckpt asks to construct the Python object io.open when loaded, and "
           r"unpickling it could run any code: refused",
           "ckpt_path: checkpoint <run>/checkpoints/sent.ckpt asks to construct the Python object io.open when "
           "loaded, and unpickling it "
           "could run any code: refused (a file from elsewhere is data, not code). Only files of tensors, numbers, "
           f"strings, lists and dicts (torch.load(..., weights_only=True)) are loaded; ...{note}", 2)
      for where, cmd, note in (("eval", "evaluate", ""),
                               ("train", "train", " (before the untrained evaluation)"))],
    Case("backbone-weights-pickle", "untrusted file", "`backbone.checkpoint_path=` weights holding a pickled object",
         pickle_backbone_weights, UnsafeFileError,
         r"^backbone.checkpoint_path: weights file .*weights.pth asks to construct the Python object io.open",
         "backbone.checkpoint_path: weights file <path>/weights.pth asks to construct the Python object io.open when loaded, "
         "and unpickling it could run any code: refused (...)", 2),
    Case("prepare-tar-link", "untrusted file", "`prepare cub200 <tar>` whose archive holds a symlink (also hard "
         "links, devices, FIFOs, `..` or absolute names)", hostile_archive("link"), DatasetLayoutError,
         r"cub.tar: member 'CUB_200_2011/images/escape' is a symbolic link to '../../../..'; refused",
         "<path>/cub.tar: member 'CUB_200_2011/images/escape' is a symbolic link to '../../../..'; refused (a "
         "dataset archive holds only files and folders)", 2),
    Case("prepare-bomb", "untrusted file", "`prepare cub200 <zip> --max-unpacked-gib 0.001` on a zip that expands "
         "to 2 MiB (also: more than `--max-ratio` 100 times its size beyond 50 MiB)", hostile_archive("bomb"),
         DatasetLayoutError, r"cub.zip: announces \d.\d MiB, more than the limit of 1.0 MiB; refused",
         "<path>/cub.zip: announces 2.0 MiB, more than the limit of 1.0 MiB; refused (a decompression bomb?). "
         "Raise it with --max-unpacked-gib if the archive is genuine", 2),
    Case("prepare-truncated", "untrusted file", "`prepare cub200 <tgz>` on a truncated download",
         hostile_archive("truncated"), DatasetLayoutError,
         r"cub.tgz: the archive is truncated or corrupt \(EOFError: .*\); download it again",
         "<path>/cub.tgz: the archive is truncated or corrupt (EOFError: Compressed file ended before the "
         "end-of-stream marker was reached); download it again (nothing was installed)", 2),
    Case("index-path-outside-root", "untrusted file", "an `images.txt` line `3 ../../../outside/secret.jpg` (also "
         "absolute paths; Cars196 `relative_im_path`, SOP and In-Shop lists)", index_path_outside_root,
         DatasetLayoutError,
         r"images.txt line 3: path '../../../outside/secret.jpg' points outside the dataset root",
         "<root>/images.txt line 3: path '../../../outside/secret.jpg' points outside the dataset root "
         "<root>/images; expected a path relative to it (not absolute, no '..' leaving it): an index file must not "
         "make the loader read other files", 2),
    *[Case(f"feature-cache-{kind}", "untrusted file", f"a feature cache ({what})", bad_feature_cache(kind),
           DatasetLayoutError, rf"features.npz: {regex}.*Delete its directory", f"<path>/features.npz: {example}; "
           "expected a .npz with features (N, D) or activations (N, C, H, W), finite floats; labels (N,) integers; "
           "split (N,) 0 train / 1 test. Delete its directory (<path>) to rebuild it", 2)
      for kind, what, regex, example in (
          ("truncated", "`features.npz` cut in half", r"not a readable feature cache \(.*BadZipFile",
           "not a readable feature cache (feature cache: cannot read <path>: BadZipFile: File is not a zip file)"),
          ("short-labels", "9 labels for 10 feature rows",
           r"not a usable feature cache: 10 feature rows but labels of shape \(9,\)",
           "not a usable feature cache: 10 feature rows but labels of shape (9,) (int64)"),
          ("nan", "a NaN feature", r"not a usable feature cache: 1 of 10 feature rows hold NaN",
           "not a usable feature cache: 1 of 10 feature rows hold NaN or infinite values"))],
    # ---- issue 21: evaluate's options ----
    Case("evaluate-no-ckpt-path", "evaluate", "`python -m ddtas_lightning.evaluate` without `ckpt_path`",
         evaluate_with(ckpt=False), ConfigError, r"^ckpt_path is required: python -m ddtas_lightning.evaluate",
         "ckpt_path is required: python -m ddtas_lightning.evaluate ckpt_path=<run dir>/checkpoints/<file>.ckpt (a "
         "checkpoint written by ddtas_lightning.train)", 2),
    *[Case(f"evaluate-inspect-{key.replace('_', '-')}", "evaluate", f"`evaluate inspect.{key}={bad}`",
           evaluate_with(f"inspect.{key}={bad}"), ConfigError, rf"inspect.{key} must be an integer >= {low}, got {bad}",
           f"inspect.{key} must be an integer >= {low}, got {bad}", 2)
      for key, bad, low in (("thumb", 2, 16), ("top_k", 0, 1))],
    # ---- issue 21: full and read-only disks, signals ----
    *[Case(f"{command}-{'disk-full' if code == errno.ENOSPC else 'read-only'}", "outputs",
           f"`{trigger}` on a disk that {'fills up' if code == errno.ENOSPC else 'turns out read-only'} "
           f"({errno.errorcode[code]})", disk_error(command, code), error, regex, example, 2)
      for command, code, trigger, error, regex, example in (
          ("evaluate", errno.ENOSPC, "evaluate", ConfigError,
           r"^cannot write the evaluation's outputs in .*out: No space left on device \(errno 28, ENOSPC\); nothing "
           r"was kept",
           "cannot write the evaluation's outputs in <dir>/out: No space left on device (errno 28, ENOSPC); nothing was "
           "kept. Free space on (or make writable) <dir>/out, or choose another hydra.run.dir (no gallery.json without "
           "metrics.json: the outputs are staged and moved into place together)"),
          ("evaluate", errno.EROFS, "evaluate", ConfigError,
           r"^cannot write the evaluation's outputs in .*out: Read-only file system \(errno 30, EROFS\)",
           "cannot write the evaluation's outputs in <dir>/out: Read-only file system (errno 30, EROFS); nothing was "
           "kept. ..."),
          ("compare", errno.ENOSPC, "compare --out OUT", SweepError,
           r"^--out .*out: cannot write the report there \(No space left on device \(errno 28, ENOSPC\)\); nothing "
           r"was kept",
           "--out <dir>/out: cannot write the report there (No space left on device (errno 28, ENOSPC)); nothing was "
           "kept. Free space or choose a writable directory (no 0-byte report.md)"),
          ("compare", errno.EROFS, "compare --out OUT", SweepError,
           r"^--out .*out: cannot write the report there \(Read-only file system",
           "--out <dir>/out: cannot write the report there (Read-only file system (errno 30, EROFS)); nothing was kept. "
           "..."),
          ("study", errno.ENOSPC, "study DIR --out OUT", SweepError,
           r"^--out .*out: cannot write the report there \(No space left on device",
           "--out <dir>/out: cannot write the report there (No space left on device (errno 28, ENOSPC)); nothing was "
           "kept. ..."),
          ("feature-cache", errno.ENOSPC, "dataset=cached_features", DatasetLayoutError,
           r"^cannot write the feature cache .*features.npz: No space left on device \(ENOSPC\); nothing was kept",
           "cannot write the feature cache <root>/<name>-<hash>/features.npz: No space left on device (ENOSPC); "
           "nothing was kept (no .tmp.npz). Free space on (or make writable) its directory, or set "
           "dataset.source.root to another one"),
          ("synthetic", errno.EROFS, "dataset=synthetic", DatasetLayoutError,
           r"^cannot write the synthetic dataset in .*out: Read-only file system \(EROFS\); nothing was kept",
           "cannot write the synthetic dataset in <dir>/out: Read-only file system (EROFS); nothing was "
           "kept. Free space on (or make writable) that directory, or set paths.data_dir (or dataset.source.root) "
           "to another one"))],
    Case("evaluate-sigterm", "outputs", "SIGTERM (or Ctrl-C: exit 130) while `evaluate` writes its gallery",
         evaluate_sigterm, EvaluationStopped,
         r"^evaluate stopped by SIGTERM; nothing was written \(the partial outputs were removed\)",
         "evaluate stopped by SIGTERM; nothing was written (the partial outputs were removed); run it again to "
         "evaluate", 143),
]


def cli_exit_code(exc: BaseException) -> int | None:
    """The exit code ``python -m ddtas_lightning.train`` ends with for ``exc``: 1 for Hydra's
    composition errors, else ``train.exit_code_for`` (2 for one ``error:`` line, None for a traceback).
    ``compare`` / ``study`` print a SweepError as one line (exit 2); ``evaluate`` stopped by a signal
    prints one line and exits 128 + the signal."""
    if isinstance(exc, HYDRA_ERRORS):
        return 1
    if isinstance(exc, SweepError):
        return 2
    if isinstance(exc, EvaluationStopped):
        return 128 + exc.signum
    return exit_code_for(exc)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, data_dir) -> Path:
    """last.ckpt of a one-step default run (resnet10t, backbone.dim=16, static policy), with the config
    Hydra would have saved next to it in ``<run>/.hydra/config.yaml``."""
    root = tmp_path_factory.mktemp("ckpt_run")
    cfg = compose_train([*TINY_DATA, *[o for o in FAST if not o.startswith("callbacks")]], root, data_dir)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture
def ctx(tmp_path, data_dir, request) -> SimpleNamespace:
    return SimpleNamespace(tmp=tmp_path, data_dir=data_dir, ckpt=lambda: request.getfixturevalue("trained_ckpt"))


def test_case_names_are_unique_and_examples_match_their_regex():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for case in CASES:
        assert re.search(case.match, case.example, re.S), (case.name, case.example)
        assert (case.error is None) == (case.exit == 0), case.name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, ctx):
    if case.error is None:  # handled: the runner asserts the outcome
        case.run(ctx)
        return
    with pytest.raises(Exception) as info:
        case.run(ctx)
    cause = info.value if isinstance(info.value, HYDRA_ERRORS) else _root_cause(info.value)
    assert isinstance(cause, case.error), f"{type(cause).__name__}: {cause}"
    assert re.search(case.match, str(cause), re.S), str(cause)
    assert cli_exit_code(info.value) == case.exit, f"the CLI would not print one line: {cause!r}"


def test_resuming_with_the_same_config_passes_the_check(ctx):
    cfg = compose_train(overrides_of(ctx, ("ckpt_path={ckpt}",)), ctx.tmp, ctx.data_dir)
    _, module = build(cfg)
    assert resolve_ckpt(cfg, ctx.tmp, module) == str(ctx.ckpt())


@pytest.mark.slow  # ~10-25 s a subprocess; the in-process cases check the same messages and cli_exit_code
@pytest.mark.parametrize("case", [c for c in CASES if c.cli], ids=lambda c: c.name)
def test_cli_prints_one_line_and_exits_with_the_code(case: Case, ctx):
    overrides = overrides_of(ctx, case.run.overrides)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "ddtas_lightning.train", f"hydra.run.dir={ctx.tmp}/run",
         f"paths.data_dir={ctx.data_dir}", *overrides],
        capture_output=True, text=True, cwd=ctx.tmp, env=env, timeout=600,
    )
    assert proc.returncode == case.exit, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(case.match, last), last


# ---- docs/bad_inputs.md ---------------------------------------------------------------------------
def render_doc() -> str:
    """The markdown table of CASES (docs/bad_inputs.md)."""
    lines = [
        "# Bad inputs and what they get",
        "",
        "Generated from `tests/test_bad_inputs.py` (`UPDATE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py -k doc`);",
        "every row is a test case, run in-process, and the message shown matches the regex the test checks.",
        "",
        "`python -m ddtas_lightning.train` prints a bad config value, dataset layout or checkpoint as one line,",
        "`error: <message>`, and exits with code **2** (no traceback): the message names the key or the file",
        "and what is allowed or expected. Hydra's own errors (an unknown group option or key, a malformed",
        "override) keep Hydra's message and exit code **1**. A run that could not train (every update non-finite)",
        "exits with code **3**, as the non-finite guard does. Rows with exit code 0 are inputs that are not",
        "errors but are handled in a defined way. `<root>`, `<run>`, `<path>` stand for your paths; `...`",
        "marks text shortened here. Rows whose input names another command (`evaluate`, `prepare`, `compare`,",
        "`study`) are that command's: it prints the same one `error:` line (`evaluate` stopped by a signal exits",
        "128 + the signal). Files from elsewhere (checkpoints, archives, index files, caches) are untrusted:",
        "[security.md](security.md).",
        "",
    ]
    category = None
    for case in CASES:
        if case.category != category:
            category = case.category
            lines += ["", f"## {category[0].upper()}{category[1:]}", "",
                      "| case | input | exception | message / outcome | exit |", "|---|---|---|---|---|"]
        error = f"`{case.error.__name__}`" if case.error else "none"
        # a code span, so <root> etc. are not read as HTML; double backticks, as messages may contain one
        example = ("`` " + case.example + " ``").replace("|", "\\|") if case.error else case.example
        lines.append(f"| `{case.name}` | {case.trigger.replace('|', chr(92) + '|')} | {error} | {example} | {case.exit} |")
    return "\n".join(lines) + "\n"


def test_doc_lists_every_case():
    if os.environ.get("UPDATE_BAD_INPUTS_DOC"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(render_doc())
    assert DOC.is_file(), "run UPDATE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py -k doc"
    assert DOC.read_text() == render_doc(), (
        "docs/bad_inputs.md is out of date: UPDATE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py -k doc")

