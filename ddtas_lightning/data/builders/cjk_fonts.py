"""``prepare cjk_fonts``: one class per CJK ideograph, one image per distinct font face drawing it.

    python -m ddtas_lightning.data.prepare cjk_fonts [--classes N] [--size PX] [--min-faces M]
        [--data-dir data] [--source FOLDER] [--packages a,b,...] [--chars 4E00-9FFF] [--force]

Source: the Debian font packages ``PACKAGES``, fetched with ``apt-get download`` and unpacked with
``dpkg -x`` (nothing is installed) into ``<data-dir>/.cache/cjk_fonts/{debs,root/<package>}`` (kept for
the next run), or ``--source`` = a folder of font files (``.ttf .otf .ttc .otc``, searched recursively; a
folder per package laid out as ``dpkg -x`` leaves it, e.g. that cache's ``root/``, keeps the package names
and licences). Each package's licence is read from its ``usr/share/doc/<package>/copyright``.

Faces (every face of every file; a ``.ttc`` holds several), in four steps, each recorded in the manifest:

1. coverage: a face's cmap must map at least a tenth of the character set (``--chars``), else it is no CJK
   ideograph face (Latin-only, Hangul-only, extension-B-only files);
2. one weight per family: faces whose family names are equal once weight words (Light, Bold, W3, ...) and
   region tags (JP KR SC TC HK CN TW MBE) are removed are one design; the weight nearest 400 (Regular)
   is kept, upright before italic. So Noto Sans CJK gives one face (JP Regular), not 10;
3. ink: a face must draw ink for at least half of the probe ideographs it maps (a few map ideographs to
   empty glyphs, or fail in FreeType's hinting interpreter);
4. same design: faces are taken by coverage (then package, file, index) and one whose probe glyphs lie
   within ``DUPLICATE_DISTANCE`` of a kept face's is a duplicate of it. Probe glyphs: ``PROBE_COUNT``
   characters evenly spaced over the character set, each drawn at 32 px, its ink box centred on a 48 px
   square; distance = mean over the probes both faces map of 1 - sum(min(a, b)) / sum(max(a, b)). Measured
   on the Debian fonts: clones, proportional / mono twins and re-releases 0.00-0.06 (Takao = IPA, WQY
   Micro Hei = Droid Sans Fallback), derived and regional variants 0.11-0.31 (IPAex / IPA Mincho, UKai /
   AR PL KaitiM, UMing / AR PL Mingti2L, Noto SC / TC), distinct designs from 0.35 up. Cut: 0.33.

Classes: the ideographs the kept faces map, ranked by how many faces map them; among equally covered
ones, in the bit-reversed order of their position in codepoint order (so any prefix is spread evenly over
the block, instead of being its first radicals). Walking that ranking, each ideograph is drawn in every
face that maps it; a face drawing no ink is not counted; the ideograph becomes a class if at least
``--min-faces`` faces drew it, until ``--classes`` classes (default 600: 600 x 48 faces = 28,800 images).

Rendering: ``GLYPH_EM`` x ``--size`` px em (Pillow/FreeType, basic layout, ``index=`` for collections), the
ink box centred (scaled down only if it would not fit inside a margin of ``size // 32`` px), black on white,
8-bit grey PNG.

Layout (read by ``dataset=cjk_fonts``, i.e. :class:`~ddtas_lightning.data.folder.Folder`)::

    <data-dir>/cjk_fonts/u<5 hex digits>/<face id>.png     e.g. cjk_fonts/u04e00/noto-sans-cjk-jp.png
    <data-dir>/cjk_fonts/manifest.json                       packages, licences, faces, classes, hash

Deterministic: the same arguments and fonts give the same files (the manifest's ``content_hash``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.builders.common import (
    PREPARE,
    BuildError,
    Progress,
    add_output_options,
    check_build_options,
    check_target,
    content_hash,
    count_stats,
    file_sha256,
    note,
    require_tool,
    run_and_report,
    run_tool,
    staged_dir,
    write_manifest,
)

BUILDER_VERSION = 1
# Debian 12 (bookworm) packages with CJK ideographs that give at least one distinct face (48 in all) when
# the 49 candidates of docs/real_data.md go through the face rules; the other 13 give none (clones such as
# fonts-takao-*, fonts-umeplus, fonts-droid-fallback; empty glyphs: fonts-aoyagi-kouzan-t).
PACKAGES = (
    "fonts-aoyagi-soseki", "fonts-arphic-gbsn00lp", "fonts-arphic-gkai00mp", "fonts-arphic-ukai", "fonts-arphic-uming",
    "fonts-babelstone-han", "fonts-baekmuk", "fonts-cns11643-kai", "fonts-cns11643-sung", "fonts-cwtex-heib",
    "fonts-cwtex-kai", "fonts-cwtex-ming", "fonts-cwtex-yen", "fonts-hanazono", "fonts-horai-umefont",
    "fonts-ipaexfont-gothic", "fonts-ipamj-mincho", "fonts-kiloji", "fonts-klee", "fonts-komatuna",
    "fonts-kouzan-mouhitsu", "fonts-lxgw-wenkai", "fonts-migmix", "fonts-mona", "fonts-motoya-l-cedar", "fonts-nanum",
    "fonts-noto-cjk", "fonts-sawarabi-gothic", "fonts-sawarabi-mincho", "fonts-seto", "fonts-unfonts-core",
    "fonts-unfonts-extra", "fonts-vlgothic", "fonts-wqy-microhei", "fonts-wqy-zenhei", "fonts-yusei-magic",
)
CJK_UNIFIED = "4E00-9FFF"
DEFAULT_CLASSES = 600
DEFAULT_SIZE = 64
DEFAULT_MIN_FACES = 24
MIN_FACE_COVERAGE = 0.1    # of the character set
GLYPH_EM = 0.8             # em size as a fraction of the image side
PROBE_COUNT = 128
PROBE_EM, PROBE_CANVAS = 32, 48
DUPLICATE_DISTANCE = 0.33
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
WEIGHT_WORDS = re.compile(r"\b(hairline|thin|extra ?light|ultra ?light|light|book|regular|normal|medium|semi ?bold|"
                          r"demi ?bold|bold|extra ?bold|ultra ?bold|black|heavy|w\d)\b")
REGION_TAGS = re.compile(r"\b(jp|kr|sc|tc|hk|cn|tw|mbe)\b")
ITALIC = re.compile(r"italic|oblique", re.I)


# ---- character sets ---------------------------------------------------------------------------------------
def parse_chars(spec: str) -> list[int]:
    """``"4E00-9FFF,3400"`` -> the sorted codepoints of those ranges / single codepoints (hex)."""
    cps: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(?:U\+)?([0-9A-Fa-f]{1,6})(?:-(?:U\+)?([0-9A-Fa-f]{1,6}))?", part)
        if not m:
            raise ConfigError(f"--chars: {part!r} is not a hex codepoint or range such as 4E00-9FFF")
        lo, hi = int(m.group(1), 16), int(m.group(2) or m.group(1), 16)
        if hi < lo or hi > 0x10FFFF:
            raise ConfigError(f"--chars: range {part} is empty or beyond U+10FFFF")
        cps.update(range(lo, hi + 1))
    if len(cps) < 2:
        raise ConfigError(f"--chars {spec!r} names fewer than 2 characters")
    return sorted(cps)


def bit_reversed_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order (van der Corput): every prefix is spread evenly over 0..n-1."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))


# ---- packages --------------------------------------------------------------------------------------------
@dataclass
class Package:
    name: str
    root: Path                      # the unpacked tree (dpkg -x) or the --source folder
    version: str | None = None
    deb: str | None = None
    deb_sha256: str | None = None
    licence: list[str] = field(default_factory=list)
    licence_from: str = ""


def copyright_licences(text: str) -> tuple[list[str], str]:
    """The upstream licences a Debian copyright file names: the ``License:`` of every ``Files:`` stanza
    not for ``debian/*`` (machine-readable format, recognised by its stanzas: fonts-wqy-zenhei's misspells
    its ``Format:`` line), else the first known licence name in the free text."""
    found: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+(?:\n[ \t]+.+)*)", stanza, re.M)
        lic = re.search(r"^License:\s*(.+)", stanza, re.M)
        if files and lic and not all(f.startswith("debian/") for f in files.group(1).split()):
            name = lic.group(1).strip()
            if name not in found:
                found.append(name)
    if found:
        return found, "machine-readable copyright file (License: of the non-debian/* Files: stanzas)"
    for pattern, name in ((r"arphic public license", "Arphic Public License"),
                          (r"SIL Open Font License|OFL", "SIL Open Font License"),
                          (r"GNU General Public License|\bGPL", "GNU General Public License"),
                          (r"Apache License", "Apache License"), (r"public domain", "public domain"),
                          (r"\bMIT\b", "MIT")):
        if re.search(pattern, text, re.I):
            return [name], "free-text copyright file (first known licence name found in it)"
    return [], "free-text copyright file (no known licence name found; read it)"


def _read_licence(pkg: Package) -> None:
    f = pkg.root / "usr" / "share" / "doc" / pkg.name / "copyright"
    if f.is_file():
        pkg.licence, pkg.licence_from = copyright_licences(f.read_text(encoding="utf-8", errors="replace"))
        pkg.licence_from += f": usr/share/doc/{pkg.name}/copyright"
    else:
        pkg.licence, pkg.licence_from = [], "no usr/share/doc/<package>/copyright found"


def fetch_packages(names: tuple[str, ...], cache: Path, verbose: bool) -> list[Package]:
    """``apt-get download`` each package into ``<cache>/debs`` (unless there) and ``dpkg -x`` it into
    ``<cache>/root/<package>`` (unless done)."""
    debs, roots = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    roots.mkdir(parents=True, exist_ok=True)
    apt = dpkg = None
    out = []
    for i, name in enumerate(names, 1):
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            apt = apt or require_tool("apt-get", "the cjk_fonts builder downloads Debian font packages with "
                                      "`apt-get download`; run it on Debian/Ubuntu or pass --source <a folder of fonts>")
            note(f"cjk_fonts: [{i}/{len(names)}] apt-get download {name}", verbose)
            run_tool([apt, "download", "-q", name], f"is the Debian archive reachable (apt-get update) and does "
                     f"package {name} exist? Or pass --packages / --source", cwd=debs)
            found = sorted(debs.glob(f"{name}_*.deb"))
            if not found:
                raise BuildError(f"apt-get download {name} wrote no {name}_*.deb into {debs}")
        deb = found[-1]
        root = roots / name
        if not (root / ".unpacked").is_file():
            dpkg = dpkg or require_tool("dpkg", "the cjk_fonts builder unpacks .deb files with `dpkg -x` (no "
                                        "install); pass --source <a folder of fonts> where dpkg is missing")
            note(f"cjk_fonts: [{i}/{len(names)}] dpkg -x {deb.name}", verbose)
            tmp = roots / f".{name}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            run_tool([dpkg, "-x", str(deb), str(tmp)], f"{deb} may be damaged: delete it and run again")
            (tmp / ".unpacked").write_text(deb.name + "\n")
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        version = deb.name[len(name) + 1:].rsplit("_", 1)[0].replace("%3a", ":")
        pkg = Package(name, root, version, deb.name, file_sha256(deb))
        _read_licence(pkg)
        out.append(pkg)
    return out


def source_packages(source: Path, names: tuple[str, ...] | None) -> list[Package]:
    """``--source``: a folder of fonts. Its sub-folders holding fonts are packages (licences read as from
    ``dpkg -x`` trees); fonts directly inside it form one package named after the folder."""
    if not source.is_dir():
        what = "does not exist" if not source.exists() else "is not a folder"
        raise BuildError(f"--source {source} {what}; expected a folder of font files ({', '.join(FONT_SUFFIXES)})")
    pkgs = []
    if any(p.is_file() and p.suffix.lower() in FONT_SUFFIXES for p in source.iterdir()):
        pkgs.append(Package(source.name, source))
    for d in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _font_files(d):
            pkgs.append(Package(d.name, d))
    if names is not None:
        missing = [n for n in names if n not in {p.name for p in pkgs}]
        if missing:
            raise BuildError(f"--source {source} has no folder of fonts for {', '.join(missing)}")
        pkgs = [p for p in pkgs if p.name in names]
    if not pkgs:
        raise BuildError(f"--source {source} holds no font files ({', '.join(FONT_SUFFIXES)})")
    for p in pkgs:
        _read_licence(p)
    return pkgs


def _font_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file()
                  and not p.is_symlink())


# ---- faces ----------------------------------------------------------------------------------------------
@dataclass
class Face:
    package: str
    path: Path
    rel: str                        # path relative to the package root
    index: int
    family: str
    style: str
    weight: int
    cmap: frozenset[int]            # codepoints of the character set it maps
    id: str = ""
    fonts: dict = field(default_factory=dict, repr=False)  # em px -> ImageFont

    def font(self, em: int):
        if em not in self.fonts:
            from PIL import ImageFont

            self.fonts[em] = ImageFont.truetype(str(self.path), em, index=self.index,
                                                layout_engine=ImageFont.Layout.BASIC)
        return self.fonts[em]

    def describe(self) -> dict:
        return {"package": self.package, "file": self.rel, "index": self.index, "family": self.family,
                "style": self.style, "weight": self.weight, "maps": len(self.cmap)}


def read_faces(pkgs: list[Package], charset: list[int]) -> tuple[list[Face], list[dict]]:
    """Every face of every font file (fontTools: names, OS/2 weight, cmap); unreadable ones are dropped."""
    import logging

    from fontTools.ttLib import TTCollection, TTFont

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # its notes on odd 'post' tables are not ours
    wanted = set(charset)
    faces, dropped = [], []
    for pkg in pkgs:
        for path in _font_files(pkg.root):
            rel = path.relative_to(pkg.root).as_posix()
            try:
                if path.suffix.lower() in (".ttc", ".otc"):
                    with TTCollection(str(path), lazy=True) as collection:
                        n = len(collection.fonts)
                else:
                    n = 1
            except Exception as e:  # noqa: BLE001 - a broken file is named and skipped, whatever fontTools says
                dropped.append({"package": pkg.name, "file": rel, "index": None, "reason": f"unreadable: {e}"})
                continue
            for i in range(n):
                t = None
                try:
                    t = TTFont(str(path), fontNumber=i, lazy=True)
                    names = t["name"]
                    family = names.getDebugName(16) or names.getDebugName(1) or path.stem
                    style = names.getDebugName(17) or names.getDebugName(2) or ""
                    cmap = frozenset(c for c in (t.getBestCmap() or {}) if c in wanted)
                    try:
                        weight = int(t["OS/2"].usWeightClass)
                    except Exception:  # noqa: BLE001 - a missing or truncated OS/2 table: assume Regular
                        weight = 400
                except Exception as e:  # noqa: BLE001
                    dropped.append({"package": pkg.name, "file": rel, "index": i, "reason": f"unreadable: {e}"})
                    continue
                finally:
                    if t is not None:
                        t.close()
                faces.append(Face(pkg.name, path, rel, i, family.strip(), style.strip(), weight, cmap))
    return faces, dropped


def family_key(face: Face) -> str:
    key = WEIGHT_WORDS.sub(" ", face.family.lower())
    return " ".join(REGION_TAGS.sub(" ", key).split())


def probe_chars(charset: list[int]) -> list[int]:
    n = min(PROBE_COUNT, len(charset))
    return [charset[(2 * i + 1) * len(charset) // (2 * n)] for i in range(n)]


def draw(face: Face, cp: int, em: int, canvas: int, margin: int):
    """The glyph of ``cp`` as white-on-black "L" of ``canvas`` px, ink box centred (scaled down only to
    fit inside ``margin``), or None when FreeType fails or draws no ink."""
    from PIL import Image, ImageDraw

    big = Image.new("L", (3 * em, 3 * em), 0)
    try:
        ImageDraw.Draw(big).text((3 * em // 2, 3 * em // 2), chr(cp), font=face.font(em), fill=255, anchor="mm")
    except (OSError, ValueError):
        return None
    box = big.getbbox()
    if box is None:
        return None
    ink = big.crop(box)
    room = canvas - 2 * margin
    if ink.width > room or ink.height > room:
        scale = room / max(ink.width, ink.height)
        ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                         Image.Resampling.LANCZOS)
    out = Image.new("L", (canvas, canvas), 0)
    out.paste(ink, ((canvas - ink.width) // 2, (canvas - ink.height) // 2))
    return out


def select_faces(faces: list[Face], charset: list[int], verbose: bool = True) -> tuple[list[Face], list[dict]]:
    """Steps 1-4 of the module docstring: the kept faces (with ids) and the dropped ones with reasons."""
    import numpy as np

    dropped: list[dict] = []
    need = max(1, int(MIN_FACE_COVERAGE * len(charset)))
    ok = []
    for f in faces:
        if len(f.cmap) < need:
            dropped.append({**f.describe(), "reason": f"maps {len(f.cmap)} of the {len(charset)} characters "
                            f"(< {need}, a tenth)"})
        else:
            ok.append(f)
    groups: dict[str, list[Face]] = {}
    for f in ok:
        groups.setdefault(family_key(f), []).append(f)
    ok = []
    for key, members in groups.items():
        members = sorted(members, key=lambda f: (abs(f.weight - 400), f.weight, bool(ITALIC.search(f.style))))
        ok.append(members[0])
        for f in members[1:]:
            dropped.append({**f.describe(), "reason": f"another weight / region of family '{key}' "
                            f"(kept: {members[0].family} {members[0].style})"})
    ok.sort(key=lambda f: (-len(f.cmap), f.package, f.rel, f.index))
    probes = probe_chars(charset)
    views: dict[int, dict[int, np.ndarray]] = {}
    inked = []
    for f in ok:
        mapped = [c for c in probes if c in f.cmap]
        v = {}
        for c in mapped:
            im = draw(f, c, PROBE_EM, PROBE_CANVAS, 0)
            if im is not None:
                v[c] = np.asarray(im, np.float32)
        if not mapped or 2 * len(v) < len(mapped):
            dropped.append({**f.describe(), "reason": f"draws ink for {len(v)} of the {len(mapped)} probe "
                            "characters it maps"})
            continue
        views[id(f)] = v
        inked.append(f)
    kept: list[Face] = []
    least = max(1, min(8, len(probes) // 4))
    for f in inked:
        twin = None
        for k in kept:
            common = sorted(set(views[id(f)]) & set(views[id(k)]))
            if len(common) < least:
                continue
            d = float(np.mean([1 - np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9)
                               for a, b in ((views[id(f)][c], views[id(k)][c]) for c in common)]))
            if d < DUPLICATE_DISTANCE:
                twin = (k, d)
                break
        if twin is None:
            kept.append(f)
        else:
            dropped.append({**f.describe(), "reason": f"same design as {twin[0].family} {twin[0].style} "
                            f"({twin[0].package}): probe distance {twin[1]:.3f} < {DUPLICATE_DISTANCE}"})
    used: set[str] = set()
    for f in kept:
        base = re.sub(r"[^a-z0-9]+", "-", f.family.lower()).strip("-") or "face"
        fid, n = base, 2
        while fid in used:
            fid, n = f"{base}-{n}", n + 1
        f.id = fid
        used.add(fid)
    note(f"cjk_fonts: {len(kept)} distinct faces of {len(faces)} ({len(dropped)} left out; see the manifest)",
         verbose)
    return kept, dropped


# ---- classes and the build ------------------------------------------------------------------------------
def ranked_chars(faces: list[Face], charset: list[int]) -> list[tuple[int, int]]:
    """``[(codepoint, faces mapping it)]``, most covered first; ties in bit-reversed codepoint order."""
    cover = {c: 0 for c in charset}
    for f in faces:
        for c in f.cmap:
            cover[c] += 1
    out = []
    for level in sorted({v for v in cover.values() if v}, reverse=True):
        tied = [c for c in charset if cover[c] == level]
        out += [(tied[i], level) for i in bit_reversed_order(len(tied))]
    return out


def build(data_dir: Path, *, classes: int = DEFAULT_CLASSES, size: int = DEFAULT_SIZE,
          min_faces: int = DEFAULT_MIN_FACES, packages: tuple[str, ...] | None = None, source: Path | None = None,
          chars: str = CJK_UNIFIED, force: bool = False, name: str = "cjk_fonts", verbose: bool = True) -> Path:
    """Write the CJK-fonts set into ``data_dir / name`` (module docstring); returns that folder."""
    from PIL import ImageOps

    check_build_options(classes, size, min_faces, "--min-faces")
    charset = parse_chars(chars)
    data_dir = Path(data_dir)
    check_target(data_dir / name, force)
    if source is None:
        pkgs = fetch_packages(tuple(packages or PACKAGES), data_dir / ".cache" / "cjk_fonts", verbose)
    else:
        pkgs = source_packages(Path(source), None if packages is None else tuple(packages))
    faces, unreadable = read_faces(pkgs, charset)
    kept, dropped = select_faces(faces, charset, verbose)
    if len(kept) < min_faces:
        raise BuildError(f"only {len(kept)} distinct faces map at least a tenth of the characters (need "
                         f"--min-faces {min_faces}); lower --min-faces or add packages")
    em, margin = max(4, round(GLYPH_EM * size)), max(1, size // 32)
    by_id = {f.id: f for f in kept}
    rows, total, tried = [], 0, 0
    with staged_dir(data_dir, name, force) as out:
        bar = Progress(classes, "cjk_fonts: classes", enabled=verbose)
        for cp, cover in ranked_chars(kept, charset):
            if len(rows) == classes or cover < min_faces:
                break
            tried += 1
            images = {}
            for f in kept:
                if cp in f.cmap:
                    im = draw(f, cp, em, size, margin)
                    if im is not None:
                        images[f.id] = ImageOps.invert(im)
            if len(images) < min_faces:
                continue
            folder = f"u{cp:05x}"
            (out / folder).mkdir()
            for fid in sorted(images):
                images[fid].save(out / folder / f"{fid}.png", format="PNG", compress_level=6)
            rows.append({"folder": folder, "char": chr(cp), "codepoint": f"U+{cp:04X}", "faces": len(images),
                         "faces_mapping": cover})
            total += len(images)
            bar.update()
        bar.close()
        if len(rows) < 2:
            raise BuildError(f"only {len(rows)} characters are drawn by at least {min_faces} faces; lower "
                             "--min-faces")
        if len(rows) < classes:
            note(f"cjk_fonts: only {len(rows)} characters are drawn by at least {min_faces} faces (asked for "
                 f"{classes})", verbose)
        rows.sort(key=lambda r: r["folder"])
        counts = {fid: 0 for fid in by_id}
        for r in rows:
            for p in (out / r["folder"]).iterdir():
                counts[p.stem] += 1
        manifest = {
            "builder": "ddtas_lightning.data.builders.cjk_fonts", "builder_version": BUILDER_VERSION,
            "command": f"{PREPARE} cjk_fonts", "arguments": {
                "classes": classes, "size": size, "min_faces": min_faces,
                "packages": None if packages is None else list(packages),
                "source": None if source is None else str(source), "chars": chars},
            "packages": {p.name: {"version": p.version, "deb": p.deb, "deb_sha256": p.deb_sha256,
                                  "licence": p.licence, "licence_from": p.licence_from,
                                  "faces_kept": sum(f.package == p.name for f in kept)} for p in pkgs},
            "rules": {"min_face_coverage": MIN_FACE_COVERAGE, "duplicate_distance": DUPLICATE_DISTANCE,
                      "probe_count": PROBE_COUNT, "glyph_em": GLYPH_EM, "margin_px": margin},
            "faces": [{"id": f.id, **f.describe(), "images": counts[f.id]} for f in kept],
            "faces_left_out": unreadable + dropped,
            "image": {"format": "PNG", "mode": "L", "size": [size, size], "note": "black glyph on white"},
            "num_classes": len(rows), "num_images": total, "characters_tried": tried,
            "images_per_class": count_stats(r["faces"] for r in rows),
            "content_hash": content_hash(out), "classes": rows,
        }
        write_manifest(out, manifest)
    note(f"cjk_fonts: wrote {total} images of {len(rows)} classes into {data_dir / name} "
         f"({manifest['content_hash']})", verbose)
    return data_dir / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PREPARE} cjk_fonts", description="Build the CJK-fonts set (one class per ideograph, one image "
        "per distinct font face) from Debian font packages; see docs/real_data.md.")
    parser.add_argument("--classes", type=int, default=DEFAULT_CLASSES,
                        help=f"number of classes (default {DEFAULT_CLASSES}; fewer if fewer qualify)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in px (default {DEFAULT_SIZE})")
    parser.add_argument("--min-faces", type=int, default=DEFAULT_MIN_FACES,
                        help=f"keep ideographs drawn by at least this many faces (default {DEFAULT_MIN_FACES})")
    parser.add_argument("--packages", default=None, help="comma-separated Debian packages (default: the "
                        f"{len(PACKAGES)} of docs/real_data.md); with --source, its sub-folders to use")
    parser.add_argument("--chars", default=CJK_UNIFIED, help="hex codepoint ranges of the candidate characters "
                        f"(default {CJK_UNIFIED}, CJK Unified Ideographs)")
    add_output_options(parser, "cjk_fonts", "a folder of font files instead of apt-get download (sub-folders "
                       "= packages)")
    args = parser.parse_args(argv)
    packages = None if args.packages is None else tuple(p.strip() for p in args.packages.split(",") if p.strip())
    return run_and_report(
        lambda: build(args.data_dir, classes=args.classes, size=args.size, min_faces=args.min_faces,
                      packages=packages, source=args.source, chars=args.chars, force=args.force, name=args.name,
                      verbose=not args.quiet),
        "cjk_fonts", args.data_dir, (BuildError, ConfigError, OSError))


if __name__ == "__main__":
    sys.exit(main())
