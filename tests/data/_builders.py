"""What the builder tests (``test_prepare_emoji``, ``test_prepare_cjk_fonts``) share: fake external tools
and a rebuild that fails midway."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.data.builders.common import MANIFEST, BuildError, content_hash
from ddtas_lightning.data.prepare import main

CONF = Path(__file__).resolve().parents[2] / "conf"


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    """An executable ``bin_dir/name`` that runs the Python ``script`` (put ``bin_dir`` on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / name).write_text(f"#!{sys.executable}\n{script}\n")
    (bin_dir / name).chmod(0o755)


def fail_on_call(real, n: int):
    """``real`` wrapped to raise ``OSError("disk full")`` on its ``n``-th call (a write failing midway)."""
    calls = 0

    def failing(*args):
        nonlocal calls
        calls += 1
        if calls == n:
            raise OSError("disk full")
        return real(*args)

    return failing


def snapshot(root: Path) -> tuple[str, bytes]:
    """A built set's content hash and manifest bytes."""
    return content_hash(root), (root / MANIFEST).read_bytes()


def build_then_refuse_again(make: Callable[[], Path]) -> tuple[Path, tuple[str, bytes]]:
    """``make()`` builds a set; a second ``make()`` (no ``force``) is refused as already existing. Returns the
    set's folder and its :func:`snapshot` from before the refusal."""
    root = make()
    before = snapshot(root)
    with pytest.raises(BuildError, match="already exists; pass --force"):
        make()
    return root, before


def assert_failed_rebuild_kept(root: Path, before: tuple[str, bytes], argv: list[str], capsys) -> None:
    """``prepare <argv>``, a ``--force`` rebuild whose writing fails with "disk full", exits 2 with that one
    error and leaves ``root`` as it was (``before``: its :func:`snapshot`), with no partial or old folder."""
    assert main(argv) == 2
    assert "error: disk full" in capsys.readouterr().err
    assert snapshot(root) == before
    assert not (root.parent / f".{root.name}.partial").exists() and not (root.parent / f".{root.name}.old").exists()


def dataset_config(dataset: str, data_dir: Path) -> DictConfig:
    """``conf/dataset/<dataset>.yaml`` as ``cfg.dataset`` of a config whose ``paths.data_dir`` is ``data_dir``
    (``instantiate(cfg.dataset.source)`` reads the built set)."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}})
    cfg.dataset = OmegaConf.load(CONF / "dataset" / f"{dataset}.yaml")
    return cfg
