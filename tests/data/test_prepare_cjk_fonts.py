"""``prepare cjk_fonts`` on matplotlib's bundled fonts, with Latin and Greek capitals standing in for the
ideographs (``--chars``): face rules, class ranking, layout, centring, manifest, determinism, errors, no
overwrite on failure, the apt-get / dpkg path on a tiny .deb, and the built tree through its config."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from ddtas_lightning.data.builders import cjk_fonts
from ddtas_lightning.data.builders.common import content_hash
from ddtas_lightning.data.prepare import main
from tests.data._builders import (
    assert_failed_rebuild_kept,
    build_then_refuse_again,
    dataset_config,
    fail_on_call,
    fake_tool,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
TTF = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
CHARS = "0041-005A,0391-03A9"  # 26 Latin + 24 Greek capitals (U+03A2 is unassigned)
DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: dejavu

Files: *
Copyright: 2003 Bitstream, Inc.
License: Bitstream-Vera
 Permission is hereby granted ...

Files: debian/*
Copyright: 2024 Someone
License: GPL-2+
"""


def renamed_copy(src: Path, dst: Path, family: str) -> None:
    """The same outlines under another family name (a clone: must be found by its glyphs, not its name)."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(src))
    for rec in font["name"].names:
        if rec.nameID in (1, 4, 16):
            rec.string = family
        elif rec.nameID == 6:
            rec.string = family.replace(" ", "")
    dst.parent.mkdir(parents=True, exist_ok=True)
    font.save(str(dst))


def write_fonts(root: Path) -> Path:
    """Folders laid out as ``dpkg -x`` leaves packages: fonts + usr/share/doc/<package>/copyright."""
    layout = {"fonts-dejavu": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf"],
              "fonts-serif": ["DejaVuSerif.ttf"], "fonts-stix": ["STIXGeneral.ttf"], "fonts-cm": ["cmr10.ttf"]}
    for pkg, files in layout.items():
        for f in files:
            (root / pkg / "usr/share/fonts/truetype").mkdir(parents=True, exist_ok=True)
            shutil.copy(TTF / f, root / pkg / "usr/share/fonts/truetype" / f)
    renamed_copy(TTF / "DejaVuSerif.ttf", root / "fonts-twin" / "TwinSerif.ttf", "Twin Serif")
    for pkg, text in {"fonts-dejavu": DEP5, "fonts-serif": "These fonts are under the SIL Open Font License.\n"}.items():
        (root / pkg / "usr/share/doc" / pkg).mkdir(parents=True)
        (root / pkg / "usr/share/doc" / pkg / "copyright").write_text(text)
    return root


@pytest.fixture(scope="module")
def fonts(tmp_path_factory) -> Path:
    return write_fonts(tmp_path_factory.mktemp("fonts"))


def build(fonts: Path, data: Path, **kw) -> Path:
    kw = {"classes": 6, "size": 32, "min_faces": 4, **kw}
    return cjk_fonts.build(data, source=fonts, chars=CHARS, verbose=False, **kw)


def test_face_rules(fonts):
    charset = cjk_fonts.parse_chars(CHARS)
    assert len(charset) == 51 and charset[:2] == [0x41, 0x42] and charset[-1] == 0x3A9
    faces, unreadable = cjk_fonts.read_faces(cjk_fonts.source_packages(fonts, None), charset)
    assert unreadable == [] and len(faces) == 7
    kept, dropped = cjk_fonts.select_faces(faces, charset, verbose=False)
    # by coverage (50 before cmr10's 26), then package, file
    assert [f.id for f in kept] == ["dejavu-sans", "dejavu-sans-mono", "dejavu-serif", "stixgeneral", "cmr10"]
    why = {d["family"] + " " + d["style"]: d["reason"] for d in dropped}
    assert why.keys() == {"DejaVu Sans Bold", "Twin Serif Book"}
    assert why["DejaVu Sans Bold"].startswith("another weight / region of family 'dejavu sans'")
    assert why["Twin Serif Book"].startswith("same design as DejaVu Serif Book (fonts-serif): probe distance 0.000")


def test_a_broken_font_file_is_named_and_skipped(tmp_path):
    (tmp_path / "fonts-x").mkdir()
    shutil.copy(TTF / "DejaVuSans.ttf", tmp_path / "fonts-x" / "DejaVuSans.ttf")
    (tmp_path / "fonts-x" / "broken.ttf").write_bytes(b"\x00\x01\x00\x00" + b"not a font" * 10)
    faces, unreadable = cjk_fonts.read_faces(cjk_fonts.source_packages(tmp_path, None), cjk_fonts.parse_chars(CHARS))
    assert [f.family for f in faces] == ["DejaVu Sans"]
    assert [(u["file"], u["reason"].split(":")[0]) for u in unreadable] == [("broken.ttf", "unreadable")]


def test_ranking_spreads_ties_by_bit_reversal():
    assert cjk_fonts.bit_reversed_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert cjk_fonts.bit_reversed_order(5) == [0, 4, 2, 1, 3]


def test_layout_classes_centring_and_manifest(fonts, tmp_path):
    root = build(fonts, tmp_path / "data")
    # 26 Latin capitals mapped by all 5 faces, first in bit-reversed order over 26 (5 bits): positions
    # 0, 16, 8, 24, 4, 20 = A Q I Y E U
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "u00041", "u00045", "u00049", "u00051", "u00055", "u00059"]
    assert sorted(p.name for p in (root / "u00049").iterdir()) == [
        "cmr10.png", "dejavu-sans-mono.png", "dejavu-sans.png", "dejavu-serif.png", "stixgeneral.png"]
    with Image.open(root / "u00049" / "dejavu-sans.png") as im:
        assert im.mode == "L" and im.size == (32, 32)
        a = np.asarray(im)
    assert a[0, 0] == 255 and a[16, 16] < 64  # white paper, the stem of the I is black at the centre
    ys, xs = np.nonzero(a < 128)
    assert abs(xs.min() - (31 - xs.max())) <= 1 and abs(ys.min() - (31 - ys.max())) <= 1  # ink box centred
    m = json.loads((root / "manifest.json").read_text())
    assert (m["num_classes"], m["num_images"], m["characters_tried"]) == (6, 30, 6)
    assert m["images_per_class"]["histogram"] == {"5": 6}
    assert m["classes"][0] == {"folder": "u00041", "char": "A", "codepoint": "U+0041", "faces": 5, "faces_mapping": 5}
    assert m["packages"]["fonts-dejavu"]["licence"] == ["Bitstream-Vera"]  # not debian/*'s GPL-2+
    assert m["packages"]["fonts-serif"]["licence"] == ["SIL Open Font License"]
    assert m["packages"]["fonts-stix"]["licence"] == [] and "no usr/share/doc" in m["packages"]["fonts-stix"]["licence_from"]
    assert [f["id"] for f in m["faces"]] == ["dejavu-sans", "dejavu-sans-mono", "dejavu-serif", "stixgeneral", "cmr10"]
    assert m["faces"][0]["file"] == "usr/share/fonts/truetype/DejaVuSans.ttf" and m["faces"][0]["images"] == 6
    assert len(m["faces_left_out"]) == 2
    assert m["content_hash"] == content_hash(root)


def test_coverage_tiers_and_min_faces(fonts, tmp_path):
    # 30 classes: the 26 Latin (5 faces), then 4 Greek (4 faces: cmr10 has none), bit-reversed over 24:
    # positions 0, 16, 8, 4 = Alpha, Rho (0x3A1), Iota (0x399), Epsilon (0x395)
    root = build(fonts, tmp_path / "a", classes=30)
    greek = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name >= "u00391")
    assert greek == ["u00391", "u00395", "u00399", "u003a1"]
    assert len(list((root / "u00391").iterdir())) == 4
    # with 5 faces required, only the Latin capitals qualify
    root = build(fonts, tmp_path / "b", classes=30, min_faces=5)
    assert sum(p.is_dir() for p in root.iterdir()) == 26


def test_same_arguments_same_bytes(fonts, tmp_path):
    a, b = build(fonts, tmp_path / "a"), build(fonts, tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 31 and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_cli_classes_size_and_bad_values(fonts, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["cjk_fonts", "--source", str(fonts), "--chars", CHARS, "--classes", "3", "--size", "24",
                 "--min-faces", "4", "--data-dir", str(data)]) == 0
    assert sorted(p.name for p in (data / "cjk_fonts").iterdir() if p.is_dir()) == ["u00041", "u00049", "u00051"]
    with Image.open(data / "cjk_fonts" / "u00041" / "stixgeneral.png") as im:
        assert im.size == (24, 24)
    out = capsys.readouterr()
    assert "ready: dataset=cjk_fonts" in out.out and "distinct faces" in out.err
    for bad, says in ((["--chars", "XYZ"], "--chars: 'XYZ' is not a hex codepoint"),
                      (["--classes", "1"], "--classes must be at least 2"),
                      (["--chars", CHARS, "--min-faces", "6"], "only 5 distinct faces")):
        assert main(["cjk_fonts", "--source", str(fonts), "--data-dir", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and says in err[-1]
    assert not (tmp_path / "x" / "cjk_fonts").exists()


def test_missing_apt_get_and_missing_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["cjk_fonts", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: apt-get not found on PATH") and "--source" in err[-1]
    fake_tool(tmp_path / "bin", "apt-get", "import sys\nprint('E: Unable to locate package ' + sys.argv[-1], "
              "file=sys.stderr)\nsys.exit(100)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["cjk_fonts", "--packages", "fonts-nope", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: `") and "apt-get download -q fonts-nope` failed (exit 100)" in err[-1]
    assert "E: Unable to locate package fonts-nope" in err[-1]
    assert not (tmp_path / "data" / "cjk_fonts").exists()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None, reason="needs dpkg")
def test_apt_get_download_and_dpkg_x_on_a_tiny_deb(fonts, tmp_path, monkeypatch):
    """The real unpacking path: a fake apt-get hands out a .deb built here; dpkg -x unpacks it once."""
    tree = tmp_path / "deb"
    shutil.copytree(fonts / "fonts-dejavu", tree)
    shutil.copytree(fonts / "fonts-serif" / "usr/share/fonts", tree / "usr/share/fonts", dirs_exist_ok=True)
    shutil.copy(TTF / "STIXGeneral.ttf", tree / "usr/share/fonts/truetype")
    shutil.copy(TTF / "cmr10.ttf", tree / "usr/share/fonts/truetype")
    (tree / "usr/share/doc/fonts-test").mkdir(parents=True)
    shutil.move(tree / "usr/share/doc/fonts-dejavu/copyright", tree / "usr/share/doc/fonts-test/copyright")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text("Package: fonts-test\nVersion: 1:2.0-3\nArchitecture: all\n"
                                              "Maintainer: t <t@example.org>\nDescription: test\n")
    deb = tmp_path / "fonts-test_1%3a2.0-3_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)
    log = tmp_path / "apt.log"
    fake_tool(tmp_path / "bin", "apt-get", f"import shutil, sys\nopen({str(log)!r}, 'a').write(sys.argv[-1] + '\\n')\n"
              f"shutil.copy({str(deb)!r}, '.')")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path(shutil.which('dpkg')).parent}")
    data = tmp_path / "data"
    root = cjk_fonts.build(data, packages=("fonts-test",), chars=CHARS, classes=6, size=32, min_faces=4, verbose=False)
    m = json.loads((root / "manifest.json").read_text())
    assert m["packages"]["fonts-test"]["version"] == "1:2.0-3" and m["packages"]["fonts-test"]["licence"] == [
        "Bitstream-Vera"]
    assert m["packages"]["fonts-test"]["deb"] == deb.name and len(m["packages"]["fonts-test"]["deb_sha256"]) == 64
    assert m["packages"]["fonts-test"]["faces_kept"] == 5 and m["num_images"] == 30
    assert (data / ".cache/cjk_fonts/root/fonts-test/.unpacked").is_file()
    cjk_fonts.build(data, packages=("fonts-test",), chars=CHARS, classes=6, size=32, min_faces=4, verbose=False,
                    force=True)
    assert log.read_text() == "fonts-test\n"  # the second build used the cache


def test_an_existing_set_survives_a_failed_rebuild(fonts, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    root, before = build_then_refuse_again(lambda: build(fonts, data))
    # the 300th drawing: past the face probes, inside the class images
    monkeypatch.setattr(cjk_fonts, "draw", fail_on_call(cjk_fonts.draw, 300))
    assert_failed_rebuild_kept(root, before, ["cjk_fonts", "--source", str(fonts), "--chars", CHARS, "--classes",
                                              "6", "--size", "32", "--min-faces", "4", "--data-dir", str(data),
                                              "--force", "--quiet"], capsys)


def test_built_tree_through_the_dataset_config(fonts, tmp_path):
    build(fonts, tmp_path / "data")
    cfg = dataset_config("cjk_fonts", tmp_path / "data")
    source = instantiate(cfg.dataset.source)
    train, test = source.load("train"), source.load("test")
    assert sorted(source.class_names[y] for y in set(train.labels)) == ["u00041", "u00049", "u00055"]
    assert sorted(source.class_names[y] for y in set(test.labels)) == ["u00045", "u00051", "u00059"]
    assert (len(train), len(test)) == (15, 15)
    # sorted_half, still available, puts the first three in train
    cfg.dataset.source.split = "sorted_half"
    half = instantiate(cfg.dataset.source)
    assert sorted(half.class_names[y] for y in set(half.load("train").labels)) == ["u00041", "u00045", "u00049"]
