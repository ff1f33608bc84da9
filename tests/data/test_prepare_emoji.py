"""``prepare emoji`` on a tiny fake @iconify/json package the tests write (three sets, a few flat SVG icons):
icon -> sequence mapping, layout, pixels, manifest, determinism, --classes, errors, no overwrite on failure,
and the built tree read back through conf/dataset/emoji.yaml (interleaved split, alpha over white)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from ddtas_lightning.data.builders import emoji
from ddtas_lightning.data.builders.common import BuildError, content_hash, file_sha256
from ddtas_lightning.data.prepare import main
from tests.data._builders import (
    assert_failed_rebuild_kept,
    build_then_refuse_again,
    dataset_config,
    fail_on_call,
    fake_tool,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
SETS = ("noto", "twemoji", "openmoji")
# resvg-py is a dev dependency (and the `prepare` extra); without it only the rendering tests are skipped
needs_resvg = pytest.mark.skipif(importlib.util.find_spec("resvg_py") is None,
                                 reason="resvg-py is not installed (pip install -e '.[prepare]')")


def rect(w: float, h: float, fill: str, opacity: float | None = None, x: float = 0) -> str:
    op = "" if opacity is None else f' fill-opacity="{opacity}"'
    return f'<rect x="{x}" y="0" width="{w}" height="{h}" fill="{fill}"{op}/>'


def write_package(root: Path) -> Path:
    """A miniature @iconify/json: noto (chars table, a skin tone, a private-use logo), twemoji (chars, an
    hFlip alias, a 2:1 icon), openmoji (no chars: names, a numbered name, a Unicode name, an unknown)."""
    sets = {
        "noto": {"prefix": "noto", "width": 16, "height": 16,
                 "info": {"name": "Noto Test", "license": {"title": "Apache 2.0", "spdx": "Apache-2.0"}},
                 "icons": {"grinning-face": {"body": rect(16, 16, "#ff0000")},
                           "red-heart": {"body": rect(16, 16, "#00ff00")},
                           "thumbs-up": {"body": rect(16, 16, "#0000ff")},
                           "thumbs-up-light-skin-tone": {"body": rect(16, 16, "#ffff00")},
                           "vendor-logo": {"body": rect(16, 16, "#000000")}},
                 "chars": {"1f600": "grinning-face", "2764-fe0f": "red-heart", "1f44d": "thumbs-up",
                           "1f44d-1f3fb": "thumbs-up-light-skin-tone", "e000": "vendor-logo"}},
        "twemoji": {"prefix": "twemoji", "width": 16, "height": 16,
                    "info": {"name": "Twemoji Test", "license": {"title": "CC BY 4.0", "spdx": "CC-BY-4.0"}},
                    "icons": {"grinning-face": {"body": rect(32, 16, "#0000ff"), "width": 32},
                              "heart-left": {"body": rect(8, 16, "#ff0000")}},
                    "aliases": {"red-heart": {"parent": "heart-left", "hFlip": True}},
                    "chars": {"1f600": "grinning-face", "2764": "red-heart"}},
        "openmoji": {"prefix": "openmoji", "width": 16, "height": 16,
                     "info": {"name": "OpenMoji Test", "license": {"title": "CC BY-SA 4.0", "spdx": "CC-BY-SA-4.0"}},
                     "icons": {"grinning-face": {"body": rect(16, 16, "#00ff00")},
                               "thumbs-up-1": {"body": rect(16, 16, "#ff0000", opacity=0.5)},
                               "thumbs-up-2": {"body": rect(16, 16, "#000000")},
                               "snowman": {"body": rect(16, 16, "#00ffff")},
                               "our-logo": {"body": rect(16, 16, "#ff00ff")}}},
    }
    (root / "json").mkdir(parents=True)
    (root / "package.json").write_text(json.dumps({"name": "@iconify/json", "version": "0.0.0-test"}))
    for name, data in sets.items():
        (root / "json" / f"{name}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def pkg(tmp_path) -> Path:
    return write_package(tmp_path / "iconify")


def build(pkg: Path, data: Path, **kw) -> Path:
    return emoji.build(data, source=pkg, sets=SETS, size=16, min_designs=kw.pop("min_designs", 2), verbose=False, **kw)


def rgba(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGBA" and im.size == (16, 16)
        return np.asarray(im)


def test_mapping_rules_without_rendering(pkg):
    sets, info = emoji.read_source(pkg, SETS, pkg / "cache", verbose=False)
    assert info["version"] == "0.0.0-test"
    classes, counts = emoji.map_icons(sets)
    got = {seq: {s: (icon.name, rule) for s, (icon, rule) in d.items()} for seq, d in classes.items()}
    assert got == {
        (0x1F600,): {"noto": ("grinning-face", "chars"), "twemoji": ("grinning-face", "chars"),
                     "openmoji": ("grinning-face", "name")},
        (0x2764,): {"noto": ("red-heart", "chars"), "twemoji": ("red-heart", "chars")},  # FE0F dropped
        (0x1F44D,): {"noto": ("thumbs-up", "chars"), "openmoji": ("thumbs-up-1", "numbered-name")},
        (0x2603,): {"openmoji": ("snowman", "unicode-name")},
    }
    assert counts["noto"]["skin-tone"] == 1 and counts["noto"]["unmapped"] == 1  # the private-use logo
    assert counts["openmoji"]["unmapped"] == 1  # our-logo
    assert emoji.select(classes, 2, None) == [(0x2764,), (0x1F44D,), (0x1F600,)]
    assert emoji.select(classes, 2, 2) == [(0x2764,), (0x1F600,)]  # most designs, then lowest sequence
    assert emoji.select(classes, 3, None) == [(0x1F600,)]


@needs_resvg
def test_layout_pixels_and_manifest(pkg, tmp_path):
    root = build(pkg, tmp_path / "data")
    assert root == tmp_path / "data" / "emoji"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["02764_red-heart", "1f44d_thumbs-up", "1f600_grinning-face"]  # = codepoint order
    assert sorted(p.name for p in (root / "1f600_grinning-face").iterdir()) == ["noto.png", "openmoji.png",
                                                                                  "twemoji.png"]
    assert sorted(p.name for p in (root / "02764_red-heart").iterdir()) == ["noto.png", "twemoji.png"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "data").iterdir() if p.name != ".cache")
    # a full red square; the hFlip alias of a left half is the right half; a 2:1 icon is letterboxed
    assert (rgba(root / "1f600_grinning-face" / "noto.png") == [255, 0, 0, 255]).all()
    heart = rgba(root / "02764_red-heart" / "twemoji.png")
    assert (heart[:, 8:] == [255, 0, 0, 255]).all() and (heart[:, :8, 3] == 0).all()
    wide = rgba(root / "1f600_grinning-face" / "twemoji.png")
    assert (wide[4:12] == [0, 0, 255, 255]).all() and (wide[:4, :, 3] == 0).all() and (wide[12:, :, 3] == 0).all()
    half = rgba(root / "1f44d_thumbs-up" / "openmoji.png")  # thumbs-up-1 (lowest number), 50% opaque red
    assert (half[..., :3] == [255, 0, 0]).all() and (abs(half[..., 3].astype(int) - 128) <= 1).all()

    m = json.loads((root / "manifest.json").read_text())
    assert m["num_classes"] == 3 and m["num_images"] == 7
    assert m["images_per_class"] == {"min": 2, "max": 3, "mean": 2.333, "histogram": {"2": 2, "3": 1}}
    assert m["source"]["package"] == "@iconify/json" and m["source"]["version"] == "0.0.0-test"
    assert {s: v["license"]["spdx"] for s, v in m["sets"].items()} == {
        "noto": "Apache-2.0", "twemoji": "CC-BY-4.0", "openmoji": "CC-BY-SA-4.0"}
    assert {s: v["designs_used"] for s, v in m["sets"].items()} == {"noto": 3, "twemoji": 2, "openmoji": 2}
    assert m["arguments"] == {"classes": None, "size": 16, "min_designs": 2, "sets": list(SETS), "source": str(pkg)}
    assert m["classes"][1] == {"folder": "1f44d_thumbs-up", "sequence": "U+1F44D", "text": "\U0001F44D",
                               "designs": {"noto": "thumbs-up", "openmoji": "thumbs-up-1"}}
    assert m["content_hash"] == content_hash(root)


@needs_resvg
def test_same_arguments_same_bytes(pkg, tmp_path):
    a, b = build(pkg, tmp_path / "a"), build(pkg, tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) == 8
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # manifest.json included
    # the hash is of the files: one changed byte changes it
    before = content_hash(a)
    victim = a / "02764_red-heart" / "noto.png"
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    assert content_hash(a) != before


@needs_resvg
def test_classes_cap_through_the_cli(pkg, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["emoji", "--source", str(pkg), "--sets", ",".join(SETS), "--size", "16", "--min-designs", "2",
                 "--classes", "2", "--data-dir", str(data)]) == 0
    assert sorted(p.name for p in (data / "emoji").iterdir() if p.is_dir()) == ["02764_red-heart",
                                                                                "1f600_grinning-face"]
    captured = capsys.readouterr()
    assert "ready: dataset=emoji" in captured.out and "emoji: rendering" in captured.err  # progress on stderr
    assert json.loads((data / "emoji" / "manifest.json").read_text())["arguments"]["classes"] == 2


@needs_resvg
def test_tgz_source_and_the_cached_npm_tarball(pkg, tmp_path, monkeypatch):
    """The package as npm packs it (package/json/...): as --source, and found in the cache without npm."""
    tgz = tmp_path / f"iconify-json-{emoji.ICONIFY_VERSION}.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(pkg, arcname="package")
    from_dir = build(pkg, tmp_path / "dir")
    from_tgz = build(tgz, tmp_path / "tgz")
    assert content_hash(from_tgz) == content_hash(from_dir)
    m = json.loads((from_tgz / "manifest.json").read_text())
    assert m["source"]["version"] == "0.0.0-test" and m["source"]["tarball_sha256"] == file_sha256(tgz)
    cache = tmp_path / "cached" / ".cache" / "emoji"
    cache.mkdir(parents=True)
    shutil.copy(tgz, cache / tgz.name)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm: the cached tarball is enough
    root = emoji.build(tmp_path / "cached", sets=SETS, size=16, min_designs=2, verbose=False)
    assert content_hash(root) == content_hash(from_dir)
    assert json.loads((root / "manifest.json").read_text())["source"]["how"] == f"npm pack @iconify/json@{emoji.ICONIFY_VERSION}"


@needs_resvg
def test_missing_npm_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["emoji", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: npm not found on PATH") and "--source" in err[0]
    assert not (tmp_path / "data" / "emoji").exists()


@needs_resvg
def test_unreachable_registry_names_the_package(tmp_path, monkeypatch, capsys):
    fake_tool(tmp_path / "bin", "npm", "import sys\nprint('npm error code E404', file=sys.stderr)\n"
              "print('npm error 404 Not Found - GET https://registry.npmjs.org/@iconify%2fjson', file=sys.stderr)\n"
              "print('npm error A complete log of this run can be found in: /x.log', file=sys.stderr)\n"
              "sys.exit(1)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["emoji", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a progress line ("fetching ..."), then the error
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1]
    assert f"npm pack @iconify/json@{emoji.ICONIFY_VERSION}" in errors[0] and "failed (exit 1)" in errors[0]
    assert "404 Not Found" in errors[0] and not (tmp_path / "data" / "emoji").exists()


@needs_resvg
def test_missing_source_and_missing_set(pkg, tmp_path, capsys):
    assert main(["emoji", "--source", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "d")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["emoji", "--source", str(pkg), "--sets", "noto,fxemoji", "--data-dir", str(tmp_path / "d")]) == 2
    assert "has no icon set fxemoji" in capsys.readouterr().err
    assert not (tmp_path / "d" / "emoji").exists()


def test_missing_resvg_names_the_extra(pkg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "resvg_py", None)  # import resvg_py -> ImportError
    with pytest.raises(BuildError, match=r"resvg-py.*pip install -e '\.\[prepare\]'"):
        build(pkg, tmp_path / "data")


@needs_resvg
def test_an_existing_set_survives_a_failed_rebuild(pkg, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    root, before = build_then_refuse_again(lambda: build(pkg, data))
    real = emoji.render
    monkeypatch.setattr(emoji, "render", fail_on_call(real, 4))
    assert_failed_rebuild_kept(root, before, ["emoji", "--source", str(pkg), "--sets", ",".join(SETS), "--size",
                                              "16", "--min-designs", "2", "--data-dir", str(data), "--force",
                                              "--quiet"], capsys)
    monkeypatch.setattr(emoji, "render", real)
    build(pkg, data, force=True, classes=2)  # --force that succeeds replaces it
    assert json.loads((root / "manifest.json").read_text())["num_classes"] == 2


@needs_resvg
def test_built_tree_through_the_dataset_config(pkg, tmp_path):
    """conf/dataset/emoji.yaml: interleaved split of the sorted classes, transparency over the background."""
    from ddtas_lightning.data.datamodule import DMLDataModule

    build(pkg, tmp_path / "data")
    cfg = dataset_config("emoji", tmp_path / "data")
    source = instantiate(cfg.dataset.source)
    train, test = source.load("train"), source.load("test")
    names = source.class_names
    assert sorted(names[y] for y in set(train.labels)) == ["02764_red-heart", "1f600_grinning-face"]  # 0 and 2
    assert sorted(names[y] for y in set(test.labels)) == ["1f44d_thumbs-up"]
    dm = DMLDataModule(source, SimpleNamespace(train=None, test=None), batch_size=4, K=2)
    ds = dm._dataset(test, train=False)
    i = [str(p) for p in ds.paths].index(os.path.realpath(tmp_path / "data/emoji/1f44d_thumbs-up/openmoji.png"))
    x = ds[i][0] * 255  # 50% red over white
    assert abs(x[0].mean() - 255) < 0.5 and abs(x[1].mean() - 127.5) <= 1 and abs(x[2].mean() - 127.5) <= 1
    cfg.dataset.source.background = "black"
    dm.source = instantiate(cfg.dataset.source)
    x = dm._dataset(test, train=False)[i][0] * 255
    assert abs(x[0].mean() - 127.5) <= 1 and x[1].max() == 0 and x[2].max() == 0
