"""A second embedded dataset: rendered Unicode characters (Omniglot-like, fine-grained), no download needed.

Classes are characters, instances are the same character in another font and pose. Candidate classes, in
this fixed order (``CANDIDATES``; 309 codepoints): digits, Latin capitals, Latin small letters, Greek
capitals and small letters (+ 5 symbol variants), Cyrillic capitals and small letters (+ 21 others of
Serbian, Macedonian, Ukrainian, old orthography), other Latin letters (ß æ œ ø þ ð ł ŋ ħ ı ...), ASCII
and Latin-1 symbols, maths operators, arrows, a few others. Every one is in the cmap of every font in
``FONTS`` (checked before generating, with matplotlib's FT2Font).

Deduplication rule (``dedup``): each candidate is drawn clean in DejaVuSans (160 px em, ink box centred
in a 256 px square, box-downsampled to 32 px) and dropped if its distance 1 - sum(min(a, b)) / sum(max(a,
b)) (soft IoU) to an earlier *kept* candidate is below 0.1 -- or, with ``dedup_mirror`` (default, since
``transform=simple`` flips images horizontally), that of its mirror image. Identical outlines (Latin A,
Greek Alpha, Cyrillic A) are at 0, the nearest dropped non-identical pairs (Greek rho / p, Cyrillic fita /
Greek theta) at 0.05-0.07, the nearest kept pairs (l / I, O / Theta, l / i) at 0.12-0.13. The size is kept
(em-scaled, not fitted to the ink box), so o and O, c and C stay apart. The 309 candidates leave
270 classes, 256 with ``dedup_mirror`` (b / d, p / q, N / Cyrillic I, ( / ), < / > ... merge). The first
``num_classes`` are used, the first half train, the rest test (``train_classes`` as in CUB200): with the
default 192, train = digits, Latin, Greek; test = Cyrillic, other Latin letters, symbols (like Omniglot's
alphabet-disjoint background / evaluation split).

Instances: a font drawn from ``FONTS`` (the TTF files bundled with matplotlib -- a project dependency --
under ``matplotlib.get_data_path()/fonts/ttf``: DejaVu Sans, Sans Mono, Serif and STIX General; true
italics are left out because their letter forms differ, e.g. an italic a looks like alpha), the glyph at
``glyph_size`` em with its ink box centred, then a random rotation, shear, scale and translation, stroke
thinning / thickening (PIL Min/MaxFilter), random distractor strokes, random foreground / background
colours with a minimum HSV-value gap, Gaussian blur and pixel noise. Drawn at 2x and box-downsampled.

The tree is written once in CUB-200-2011's layout and read back through :class:`CUB200`, as for
:class:`~ddtas_lightning.data.synthetic.Synthetic` (whose manifest check, atomic install and loading it
reuses; the manifest keeps that class's file name, ``synthetic.json``, with ``generator`` naming this
module)::

    <root>/CUB_200_2011/images.txt, image_class_labels.txt, classes.txt, synthetic.json
    <root>/CUB_200_2011/images/<id>.u<hex>_<unicode_name>/u<hex>_<instance>.png

Deterministic: every draw comes from ``numpy.random.default_rng([seed, 1, class, instance])``. Speed:
200 classes x 30 images of 64 px (6,000 images, 55 MB) take about 10 s of one CPU core (measured:
9.9 s CPU, 10.3 s wall; about 40% of it PNG encoding, 25% the stroke Min/MaxFilter).

Difficulty with the defaults, Recall@1 on the 96 test classes (chance 0.010): raw-pixel 1-NN 0.10, on
mean-centred absolute grey values (polarity-free) 0.35; the untrained random-init ResNet-18 + 128-d head
0.020, after 1 epoch of the default run (MS loss, 67 steps) 0.024, after 4 epochs 0.031 (held-out train
classes: 0.05, 0.09) -- where ``dataset=synthetic`` goes from 0.13 to 0.21 in one epoch. A hard set for a
network trained from scratch; ``saturation=0 blur=0 distractors=[0,0]`` make it easier (0.041 after 1 epoch).
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
import math
import os
import shutil
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.data.records import DatasetLayoutError
from ddtas_lightning.data.synthetic import MANIFEST, Synthetic

log = logging.getLogger(__name__)

POLARITIES = ("random", "dark_on_light", "light_on_dark")  # ink vs paper: either lighter, or fixed
GENERATOR_VERSION = 1  # bump when the drawing code changes: older trees regenerate
SUPERSAMPLE = 2


def _span(first: int, last: int, skip: tuple[int, ...] = ()) -> tuple[int, ...]:
    return tuple(c for c in range(first, last + 1) if c not in skip)


CANDIDATES: tuple[int, ...] = (
    _span(0x30, 0x39) + _span(0x41, 0x5A) + _span(0x61, 0x7A)  # digits, Latin
    + _span(0x391, 0x3A9, skip=(0x3A2,)) + _span(0x3B1, 0x3C9) + (0x3D1, 0x3D5, 0x3D6, 0x3F1, 0x3F5)  # Greek
    + _span(0x410, 0x44F)  # Cyrillic
    + (0x402, 0x404, 0x405, 0x406, 0x408, 0x409, 0x40A, 0x40B, 0x40F, 0x452, 0x454, 0x459, 0x45A, 0x45B,
       0x45F, 0x490, 0x491, 0x462, 0x463, 0x472, 0x473)
    + (0xDF, 0xC6, 0xE6, 0x152, 0x153, 0xD8, 0xF8, 0xDE, 0xFE, 0xD0, 0xF0, 0x141, 0x142, 0x14A, 0x14B,
       0x126, 0x127, 0x131)  # other Latin letters
    + tuple(c for c in range(0x21, 0x7F) if not chr(c).isalnum())  # ASCII symbols
    + (0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA9, 0xAC, 0xAE, 0xB0, 0xB1, 0xB6, 0xBF, 0xD7, 0xF7, 0x20AC)
    + (0x2200, 0x2202, 0x2203, 0x2207, 0x2208, 0x220F, 0x2211, 0x221A, 0x221D, 0x221E, 0x2220, 0x2227,
       0x2228, 0x2229, 0x222A, 0x222B, 0x2248, 0x2260, 0x2261, 0x2264, 0x2265, 0x2282, 0x2283, 0x2295,
       0x2297, 0x22A5)  # maths
    + _span(0x2190, 0x2195) + (0x21D2, 0x21D4)  # arrows
    + (0x2116, 0x2122, 0x25B3, 0x25CA, 0x266D, 0x266E, 0x266F)  # numero, trade mark, shapes, music
)
FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
         "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
         "DejaVuSerif", "DejaVuSerif-Bold", "STIXGeneral", "STIXGeneralBol")
DEDUP_FONT, DEDUP_THRESHOLD = "DejaVuSans", 0.1


def default_font_dir() -> Path:
    import matplotlib  # lazily: only generation needs it

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths(font_dir: str | Path | None, fonts: tuple[str, ...]) -> list[Path]:
    """The TTF files of ``fonts``; one clear error naming the directory if any is missing."""
    d = default_font_dir() if font_dir is None else Path(font_dir).expanduser()
    paths = [d / f"{f}.ttf" for f in fonts]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"glyphs: font directory {d} lacks {', '.join(missing)}; expected the TTF fonts bundled with "
            "matplotlib (matplotlib.get_data_path()/fonts/ttf; reinstall matplotlib) or set "
            "dataset.source.font_dir to a folder holding them")
    return paths


def _load(path: Path, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: the same rendering whether or not libraqm is installed.
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


def _ink(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image:
    """The glyph of ``ch`` as an "L" image cropped to its ink."""
    left, top, right, bottom = font.getbbox(ch)
    im = Image.new("L", (right - left + 4, bottom - top + 4))
    ImageDraw.Draw(im).text((2 - left, 2 - top), ch, font=font, fill=255)
    return im.crop(im.getbbox())


@functools.lru_cache(maxsize=4)
def dedup(font_dir: Path, mirror: bool) -> tuple[int, ...]:
    """``CANDIDATES`` without near-duplicates (module docstring), in order."""
    font = _load(font_dir / f"{DEDUP_FONT}.ttf", 160)

    def view(ink: Image.Image) -> np.ndarray:
        canvas = Image.new("L", (256, 256))
        canvas.paste(ink, ((256 - ink.size[0]) // 2, (256 - ink.size[1]) // 2))
        return np.asarray(canvas.reduce(8), np.float32).ravel()

    kept: list[int] = []
    views: list[np.ndarray] = []
    for cp in CANDIDATES:
        ink = _ink(font, chr(cp))
        own = view(ink)
        probes = [own, view(ink.transpose(Image.Transpose.FLIP_LEFT_RIGHT))] if mirror else [own]
        if views:
            k = np.stack(views)
            if any((1 - np.minimum(k, v).sum(1) / np.maximum(k, v).sum(1)).min() < DEDUP_THRESHOLD
                   for v in probes):
                continue
        kept.append(cp)
        views.append(own)
    return tuple(kept)


def check_coverage(paths: list[Path], classes: tuple[int, ...]) -> None:
    """Every class codepoint must be in every font's cmap (else PIL would draw the .notdef box)."""
    from matplotlib.ft2font import FT2Font

    for path in paths:
        cmap = FT2Font(str(path)).get_charmap()
        absent = [f"U+{c:04X}" for c in classes if c not in cmap]
        if absent:
            raise DatasetLayoutError(f"glyphs: font {path} has no glyph for {', '.join(absent[:10])}"
                                     f"{' ...' if len(absent) > 10 else ''}; use the matplotlib fonts")


@dataclass(frozen=True)
class GlyphsParams:
    """Everything that determines the generated bytes (recorded in the manifest)."""

    num_classes: int
    images_per_class: int
    image_size: int
    seed: int
    classes: tuple[str, ...]  # "U+0041" ..., the first num_classes deduplicated codepoints
    fonts: tuple[str, ...]
    glyph_size: float
    rotation: float
    shear: float
    scale: tuple[float, float]
    translation: float
    stroke: tuple[float, float]
    contrast: float
    saturation: float
    blur: float
    noise: float
    distractors: tuple[int, int]
    version: int = GENERATOR_VERSION
    polarity: str = "random"


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def render(p: GlyphsParams, c: int, j: int, fonts: list[ImageFont.FreeTypeFont],
           cache: dict[int, Image.Image] | None = None) -> Image.Image:
    """Instance ``j`` of class ``c`` as an RGB image; ``fonts`` at ``glyph_size``; ``cache``: font -> ink."""
    rng = np.random.default_rng([p.seed, 1, c, j])
    size = p.image_size * SUPERSAMPLE
    k = int(rng.integers(len(fonts)))
    cache = {} if cache is None else cache
    if k not in cache:
        cache[k] = _ink(fonts[k], chr(int(p.classes[c][2:], 16)))
    ink = cache[k]

    # Pose: output = centre + A (input - ink centre), A = rotation x shear x scale; PIL wants A's inverse.
    theta = math.radians(rng.uniform(-p.rotation, p.rotation))
    shear = math.tan(math.radians(rng.uniform(-p.shear, p.shear)))
    a = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) @ np.array(
        [[1.0, shear], [0.0, 1.0]]) * rng.uniform(*p.scale)
    centre = size / 2 + rng.uniform(-p.translation, p.translation, size=2) * size
    inv = np.linalg.inv(a)
    off = np.array(ink.size) / 2 - inv @ centre
    mask = ink.transform((size, size), Image.Transform.AFFINE,
                         (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]), Image.Resampling.BILINEAR)

    # Stroke weight: a radius in 2x pixels, negative thins (MinFilter), positive thickens (MaxFilter).
    r = int(round(rng.uniform(*p.stroke) * size))
    if r:
        mask = mask.filter((ImageFilter.MaxFilter if r > 0 else ImageFilter.MinFilter)(2 * abs(r) + 1))

    # Colours: an HSV-value gap of at least `contrast` between ink and paper, either one the lighter.
    gap = rng.uniform(p.contrast, 1.0)
    lo = rng.uniform(0, 1 - gap)
    light_ink = rng.uniform() < 0.5  # drawn whatever the polarity, so "random" trees keep their bytes
    if p.polarity != "random":
        light_ink = p.polarity == "light_on_dark"
    v_fg, v_bg = (lo + gap, lo) if light_ink else (lo, lo + gap)
    fg = _rgb(rng.uniform(), rng.uniform(0, p.saturation), v_fg)
    bg = _rgb(rng.uniform(), rng.uniform(0, p.saturation), v_bg)
    blur = rng.uniform(0, p.blur)

    # Distractors: bent strokes in the ink colour, anywhere (they may cross the glyph).
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(p.distractors[0], p.distractors[1] + 1))):
        start = rng.uniform(0, size, size=2)
        pts = np.vstack([start, start + rng.uniform(-0.35, 0.35, size=(2, 2)).cumsum(0) * size])
        draw.line([tuple(q) for q in pts], fill=255, width=max(1, int(rng.uniform(0.02, 0.06) * size)),
                  joint="curve")

    m = np.asarray(mask.reduce(SUPERSAMPLE), np.float32)[..., None] / 255
    image = Image.fromarray(np.clip(np.rint(bg + (fg - bg) * m), 0, 255).astype(np.uint8), "RGB")
    if blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if p.noise > 0:
        arr = np.asarray(image, np.float32) + rng.normal(0, p.noise * 255, size=(p.image_size, p.image_size, 3))
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image


def class_dir_name(c: int, p: GlyphsParams) -> str:
    """``<id>.u<hex>_<unicode name>``, e.g. ``001.u0030_digit_zero`` (ASCII only)."""
    cp = int(p.classes[c][2:], 16)
    name = unicodedata.name(chr(cp)).lower().replace(" ", "_").replace("-", "_")
    return f"{c + 1:0{max(3, len(str(p.num_classes)))}d}.u{cp:04x}_{name}"


def instance_fonts(p: GlyphsParams, paths: list[Path]) -> list[ImageFont.FreeTypeFont]:
    """The fonts of ``paths`` at ``glyph_size`` of the 2x canvas (what :func:`render` takes)."""
    return [_load(path, round(p.glyph_size * p.image_size * SUPERSAMPLE)) for path in paths]


def write_tree(p: GlyphsParams, paths: list[Path], out: Path) -> None:
    """Write the full CUB-layout tree of ``p`` into the (new) folder ``out``."""
    fonts = instance_fonts(p, paths)
    images = []
    for c in range(p.num_classes):
        name = class_dir_name(c, p)
        (out / "images" / name).mkdir(parents=True)
        cache: dict[int, Image.Image] = {}  # per class: the inks of the fonts drawn so far
        for j in range(p.images_per_class):
            rel = f"{name}/{name.split('.')[1].split('_')[0]}_{j + 1:04d}.png"
            render(p, c, j, fonts, cache).save(out / "images" / rel, optimize=False)
            images.append((rel, c + 1))
    (out / "images.txt").write_text("".join(f"{i + 1} {n}\n" for i, (n, _) in enumerate(images)))
    (out / "image_class_labels.txt").write_text("".join(f"{i + 1} {y}\n" for i, (_, y) in enumerate(images)))
    (out / "classes.txt").write_text("".join(f"{c + 1} {class_dir_name(c, p)}\n" for c in range(p.num_classes)))


class Glyphs(Synthetic):
    """Rendered Unicode characters in CUB-200-2011's layout (module docstring for the recipe).

    Generated on first :meth:`load` under ``root``, reused while the parameters match, regenerated when a
    knob changes; never overwrites a ``CUB_200_2011`` folder without a manifest (all as Synthetic).
    192 classes by default, not 200: CUB200 takes a 200-class tree for the real CUB-200-2011 and warns
    that its counts differ.

    Knobs:
        num_classes: 2 .. the number of deduplicated classes (256, or 270 without ``dedup_mirror``).
        fonts: names of TTF files in ``font_dir`` (default: matplotlib's bundled fonts, ``FONTS``).
        glyph_size: font size (em) as a fraction of the image side.
        rotation, shear: +-degrees. scale: (min, max) factor. translation: +- fraction of the side.
        stroke: (min, max) change of the stroke radius, fraction of the side (negative thins).
        contrast: minimum HSV-value gap between ink and paper (0-1). saturation: max colour saturation.
        blur: max Gaussian blur radius, pixels. noise: std of Gaussian pixel noise, fraction of 255.
        distractors: (min, max) random strokes per image.
        dedup_mirror: also drop classes that are the mirror image of an earlier one.
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 192,
        images_per_class: int = 30,
        image_size: int = 64,
        seed: int = 0,
        fonts: tuple[str, ...] | list[str] = FONTS,
        font_dir: str | Path | None = None,
        dedup_mirror: bool = True,
        glyph_size: float = 0.65,
        rotation: float = 15.0,
        shear: float = 12.0,
        scale: tuple[float, float] | list[float] = (0.8, 1.2),
        translation: float = 0.1,
        stroke: tuple[float, float] | list[float] = (-0.008, 0.02),
        contrast: float = 0.35,
        saturation: float = 0.7,
        blur: float = 0.8,
        noise: float = 0.04,
        distractors: tuple[int, int] | list[int] = (0, 1),
        polarity: str = "random",
        train_classes: int | list[int] | None = None,
        check_images: bool = True,
    ) -> None:
        if num_classes < 2 or images_per_class < 2 or image_size < 8:
            raise ValueError("Glyphs needs num_classes >= 2, images_per_class >= 2 and image_size >= 8; got "
                             f"{num_classes}, {images_per_class}, {image_size}")
        if scale[1] < scale[0] or stroke[1] < stroke[0] or not 0 <= distractors[0] <= distractors[1]:
            raise ValueError(f"scale={scale} / stroke={stroke} / distractors={distractors} must be (min, max) "
                             "ranges (distractors >= 0)")
        if not 0 <= contrast <= 1 or not 0 <= saturation <= 1:
            raise ValueError(f"contrast={contrast} and saturation={saturation} must be in [0, 1]")
        self.root = Path(root).expanduser()
        self.font_dir = font_dir
        self.dedup_mirror = bool(dedup_mirror)
        self.train_classes = train_classes
        self.check_images = check_images
        self._knobs = dict(
            num_classes=int(num_classes), images_per_class=int(images_per_class), image_size=int(image_size),
            seed=int(seed), fonts=tuple(str(f) for f in fonts), glyph_size=float(glyph_size),
            rotation=float(rotation), shear=float(shear), scale=(float(scale[0]), float(scale[1])),
            translation=float(translation), stroke=(float(stroke[0]), float(stroke[1])), contrast=float(contrast),
            saturation=float(saturation), blur=float(blur), noise=float(noise),
            distractors=(int(distractors[0]), int(distractors[1])),
        )
        check_choice("dataset.source.polarity", polarity, POLARITIES)
        if polarity != "random":  # absent from the manifest by default: existing trees stay valid
            self._knobs["polarity"] = polarity
        n_train = num_classes // 2 if train_classes is None else (
            train_classes if isinstance(train_classes, int) else len(train_classes))
        self.expected_counts = {
            "train_images": n_train * images_per_class, "train_classes": n_train,
            "test_images": (num_classes - n_train) * images_per_class, "test_classes": num_classes - n_train,
        }
        self._cub = None

    @functools.cached_property
    def _paths(self) -> list[Path]:
        return font_paths(self.font_dir, self._knobs["fonts"])

    @functools.cached_property
    def params(self) -> GlyphsParams:
        """Needs the fonts: the class list comes from the deduplication (hence lazy)."""
        n = self._knobs["num_classes"]
        ref = font_paths(self.font_dir, (DEDUP_FONT,))[0].parent
        classes = dedup(ref, self.dedup_mirror)
        if not 2 <= n <= len(classes):
            # ConfigError, not ValueError: raised at load time, outside Hydra's instantiation, it must still
            # be a one-line CLI error.
            raise ConfigError(f"dataset.source.num_classes={n} must be between 2 and {len(classes)} (the "
                              f"deduplicated characters{'' if self.dedup_mirror else ' without dedup_mirror'})")
        return GlyphsParams(**self._knobs, classes=tuple(f"U+{c:04X}" for c in classes[:n]))

    def manifest(self) -> dict:
        params = asdict(self.params)
        if params["polarity"] == "random":  # the original trees' manifest, so they are not regenerated
            del params["polarity"]
        return {"generator": "ddtas_lightning.data.glyphs", **params,
                "num_images": self.params.num_classes * self.params.images_per_class}

    def materialise(self) -> Path:
        """Generate the tree if absent or stale; return its ``CUB_200_2011`` folder."""
        found = self._current()
        if self._matches(found):
            return self.dataset_dir
        p = self.params
        check_coverage(self._paths, tuple(int(c[2:], 16) for c in p.classes))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".CUB_200_2011.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        log.info("generating the glyphs dataset in %s (%s): %d classes x %d images of %d px", self.dataset_dir,
                 "absent" if found is None else "generated with other parameters", p.num_classes,
                 p.images_per_class, p.image_size)
        try:
            write_tree(p, self._paths, tmp)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=1) + "\n")
            self._install(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("glyphs dataset ready in %.1f s", time.perf_counter() - t0)
        return self.dataset_dir

