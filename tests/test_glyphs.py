"""The embedded glyphs dataset: CUB layout, determinism, regeneration, deduplication, fonts, a training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data import CUB200, DatasetLayoutError
from ddtas_lightning.data import glyphs as gl
from ddtas_lightning.data.glyphs import Glyphs
from ddtas_lightning.runtime.errors import exit_code_for
from ddtas_lightning.runtime.training import train

TINY = dict(num_classes=6, images_per_class=3, image_size=16)


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_materialises_cub_layout_and_loads_through_cub200(tmp_path):
    s = Glyphs(tmp_path, **TINY)
    tr, te = s.load("train"), s.load("test")
    d = tmp_path / "CUB_200_2011"
    assert (d / "images.txt").read_text().splitlines()[0] == "1 001.u0030_digit_zero/u0030_0001.png"
    assert (d / "classes.txt").read_text().splitlines()[-1] == "6 006.u0035_digit_five"
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (9, 3, 9, 3)
    assert sorted(set(tr.labels)) == [1, 2, 3] and sorted(set(te.labels)) == [4, 5, 6]  # class-disjoint
    assert s.expected_counts == {"train_images": 9, "train_classes": 3, "test_images": 9, "test_classes": 3}
    assert len(CUB200(tmp_path).load("test")) == 9  # an ordinary CUB tree
    with Image.open(te.paths[0]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (16, 16))
    manifest = json.loads((d / gl.MANIFEST).read_text())
    assert manifest["generator"] == "ddtas_lightning.data.glyphs" and manifest["classes"][-1] == "U+0035"
    assert not list(tmp_path.glob(".CUB_200_2011.*"))


def test_deterministic_for_a_seed_and_seeds_differ(tmp_path):
    a = tree_bytes(Glyphs(tmp_path / "a", **TINY, seed=3).materialise())
    b = tree_bytes(Glyphs(tmp_path / "b", **TINY, seed=3).materialise())
    c = tree_bytes(Glyphs(tmp_path / "c", **TINY, seed=4).materialise())
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".png"))
    # An image does not depend on what else is generated (per-image random streams).
    small, big = Glyphs(tmp_path, **TINY), Glyphs(tmp_path, **{**TINY, "num_classes": 9, "images_per_class": 5})
    fonts = gl.instance_fonts(small.params, small._paths)
    assert np.array_equal(np.asarray(gl.render(small.params, 4, 2, fonts)),
                          np.asarray(gl.render(big.params, 4, 2, fonts)))


def test_reuses_and_regenerates_when_a_knob_changes(tmp_path, monkeypatch):
    Glyphs(tmp_path, **TINY).materialise()
    calls = []
    real = gl.write_tree
    monkeypatch.setattr(gl, "write_tree", lambda *a, **k: calls.append(1) or real(*a, **k))
    Glyphs(tmp_path, **TINY).load("train")
    assert calls == []  # same parameters: reused
    s = Glyphs(tmp_path, **TINY, shear=30.0)
    assert len(s.load("train")) == 9 and calls == [1]  # a changed knob: regenerated in place
    assert json.loads((tmp_path / "CUB_200_2011" / gl.MANIFEST).read_text())["shear"] == 30.0
    assert not list(tmp_path.glob(".CUB_200_2011.*"))


def test_deduplication_drops_lookalikes_across_scripts():
    font_dir = gl.default_font_dir()
    plain, mirror = gl.dedup(font_dir, False), gl.dedup(font_dir, True)
    assert (len(gl.CANDIDATES), len(plain), len(mirror)) == (309, 270, 256)  # the docstring's counts
    # Latin kept; Greek Alpha, Cyrillic A, Cyrillic o, Greek rho dropped; O / Theta / zero and l / I all kept.
    assert {ord(c) for c in "AoOlI0"} <= set(plain) and 0x398 in plain
    assert not {0x391, 0x410, 0x43E, 0x3C1} & set(plain)
    assert ord("d") in plain and ord("d") not in mirror and ord("b") in mirror  # mirror images merge
    # No two kept classes have equal clean DejaVuSans renderings (ink box centred on one canvas).
    font = gl._load(font_dir / "DejaVuSans.ttf", 48)
    seen = {}
    for cp in plain:
        ink = gl._ink(font, chr(cp))
        canvas = Image.new("L", (96, 96))
        canvas.paste(ink, ((96 - ink.size[0]) // 2, (96 - ink.size[1]) // 2))
        key = canvas.tobytes()
        assert key not in seen, f"U+{cp:04X} renders like U+{seen.get(key, 0):04X}"
        seen[key] = cp
    gl.check_coverage(gl.font_paths(None, gl.FONTS), gl.CANDIDATES)  # every font has every candidate


def test_missing_fonts_name_the_directory(tmp_path):
    (tmp_path / "fonts").mkdir()
    with pytest.raises(DatasetLayoutError, match=f"font directory {re.escape(str(tmp_path / 'fonts'))} lacks "
                       "DejaVuSans.ttf") as err:
        Glyphs(tmp_path / "data", **TINY, font_dir=tmp_path / "fonts").load("train")
    assert exit_code_for(err.value) == 2  # the CLI prints one error line
    assert not (tmp_path / "data").exists()  # nothing written


def test_invalid_arguments(tmp_path):
    with pytest.raises(ConfigError, match="num_classes=999 must be between 2 and 256") as err:
        Glyphs(tmp_path, num_classes=999).load("train")
    assert exit_code_for(err.value) == 2  # raised at load time, still a one-line CLI error
    with pytest.raises(ValueError, match="must be .min, max. ranges"):
        Glyphs(tmp_path, stroke=(0.02, 0.0))


def test_training_run_on_glyphs(tiny_cfg, one_thread):
    cfg = tiny_cfg("dataset=glyphs", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.check_val_every_n_epoch=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false")
    r1 = train(cfg)
    assert 0.0 <= r1 <= 1.0
    metrics = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert metrics["choices"]["dataset"] == "glyphs" and metrics["test"]["test/num_queries"] == 36
    assert (Path(cfg.paths.data_dir) / "glyphs" / "CUB_200_2011" / "classes.txt").is_file()


@pytest.mark.parametrize("polarity", ["dark_on_light", "light_on_dark"])
def test_fixed_polarity_puts_the_ink_on_the_chosen_side(tmp_path, polarity):
    plain = dict(TINY, image_size=32, saturation=0.0, blur=0.0, noise=0.0, distractors=(0, 0))
    s = Glyphs(tmp_path, **plain, polarity=polarity)
    for path in s.load("train").paths + s.load("test").paths:
        grey = np.asarray(Image.open(path).convert("L"), dtype=float)
        paper = np.bincount(grey.astype(int).ravel()).argmax()  # the most common level: the paper
        ink = grey.min() if polarity == "dark_on_light" else grey.max()
        assert (ink < paper) if polarity == "dark_on_light" else (ink > paper), path
    assert json.loads((tmp_path / "CUB_200_2011" / gl.MANIFEST).read_text())["polarity"] == polarity


def test_random_polarity_keeps_the_original_manifest_and_bad_values_name_the_key(tmp_path):
    assert "polarity" not in Glyphs(tmp_path, **TINY).manifest()  # trees written before the knob stay valid
    with pytest.raises(ConfigError, match="dataset.source.polarity"):
        Glyphs(tmp_path, **TINY, polarity="inverted")
