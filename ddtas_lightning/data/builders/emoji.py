"""``prepare emoji``: one class per emoji (a Unicode sequence), one image per vendor design of it.

    python -m ddtas_lightning.data.prepare emoji [--classes N] [--size PX] [--min-designs K]
        [--data-dir data] [--source PATH] [--sets a,b,...] [--force]

Source: the npm package ``@iconify/json`` (pinned: ``ICONIFY_VERSION``), fetched with ``npm pack`` into
``<data-dir>/.cache/emoji/`` (kept for the next run), or ``--source`` = that package unpacked (a folder
with ``json/<set>.json``, or ``package/json/...``) or its ``.tgz``. Its ``json/<set>.json`` files hold SVG
icon sets; ``EMOJI_SETS`` are the emoji sets (licence of each: its ``info.license``, copied to the manifest).

Icon -> Unicode sequence, tried in this order for each icon or alias name of a set (``MAPPINGS``):

1. ``chars``: the set's own ``chars`` table (``"1f600": "grinning-face"``);
2. ``name``: the name in any loaded set's ``chars`` table (sets without one, e.g. emojione, use the same
   CLDR-style names);
3. ``alias``: an alias name of a set with ``chars`` (``a-button`` -> its parent ``a-button-blood-type``);
4. ``unicode-name``: ``unicodedata.lookup`` of the name with spaces (``snowman`` -> U+2603);
5. ``flag-name``: ``flag-for-X`` / ``flag-for-flag-X`` -> ``flag-X`` (emojione, noto-v1);
6. ``compact-name``: a name without hyphens against the same names with spaces and hyphens removed, and
   against Unicode character names so written (fxemoji: ``automatedtellermachine`` -> U+1F3E7);
7. ``numbered-name``: ``name-<n>`` -> ``name`` (streamline-emojis: ``baby-1``; the lowest n is kept).

Sequences are compared without variation selectors (U+FE0E/FE0F). Dropped: sequences with a skin-tone
modifier (U+1F3FB-1F3FF; the default yellow design is kept), private-use codepoints (vendor logos), and
names none of the rules map. A set gives a sequence at most one design: the icon found by the earliest
rule, then visible before hidden, icon before alias, then by name. Classes: sequences with at least
``--min-designs`` designs (default 4), all of them or (``--classes N``) the N with the most designs (ties:
lowest sequence). Counts with @iconify/json 2.2.553: 1,923 classes at 4 designs (1,656 at 6; 2,019 at 2).

Rendering: each icon as an SVG (its ``viewBox``, alias flips / rotations applied as iconify does), fitted
and centred in a ``--size`` square by ``resvg-py`` (no system fonts), kept as an RGBA PNG: transparency is
composited onto ``dataset.source.background`` when the images are read (white by default).

Layout (read by ``dataset=emoji``, i.e. :class:`~ddtas_lightning.data.folder.Folder`)::

    <data-dir>/emoji/<cp>-<cp>..._<name>/<set>.png     e.g. emoji/1f600_grinning-face/twemoji.png
    <data-dir>/emoji/manifest.json                       sources, licences, classes, counts, content hash

Codepoints are 5 hex digits, so sorted folder names are in sequence order. Deterministic: the same
arguments and source give the same files (the manifest's ``content_hash``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import unicodedata
from dataclasses import dataclass
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
ICONIFY_PACKAGE = "@iconify/json"
ICONIFY_VERSION = "2.2.553"
EMOJI_SETS = ("noto", "noto-v1", "fluent-emoji", "fluent-emoji-flat", "fluent-emoji-high-contrast", "fxemoji",
              "twemoji", "emojione", "emojione-monotone", "streamline-emojis", "openmoji", "emojione-v1")
DEFAULT_SIZE = 96
DEFAULT_MIN_DESIGNS = 4
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
VARIATION_SELECTORS = frozenset((0xFE0E, 0xFE0F))
MAPPINGS = ("chars", "name", "alias", "unicode-name", "flag-name", "compact-name", "numbered-name")
INSTALL_HINT = "pip install -e '.[prepare]'"


# ---- reading the icon sets ------------------------------------------------------------------------------
def _pinned_tgz(cache: Path, verbose: bool) -> Path:
    """``<cache>/iconify-json-<version>.tgz``, fetched with ``npm pack`` when absent."""
    tgz = cache / f"iconify-json-{ICONIFY_VERSION}.tgz"
    if tgz.is_file():
        return tgz
    npm = require_tool("npm", f"the emoji builder fetches {ICONIFY_PACKAGE} with `npm pack`; install Node.js "
                              "(npm) or pass --source <the package unpacked, or its .tgz>")
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{ICONIFY_PACKAGE}@{ICONIFY_VERSION}"
    note(f"emoji: fetching {spec} (about 140 MB) with npm pack into {cache}", verbose)
    run_tool([npm, "pack", spec, "--pack-destination", str(cache), "--silent"],
             f"is the npm registry reachable and does {spec} exist? Or pass --source", cwd=cache)
    if not tgz.is_file():
        found = sorted(p.name for p in cache.glob("*.tgz"))
        raise BuildError(f"npm pack {spec} wrote no {tgz.name} into {cache} (found: {', '.join(found) or 'nothing'})")
    return tgz


def read_source(source: Path | None, sets: tuple[str, ...], cache: Path,
                verbose: bool = True) -> tuple[dict[str, dict], dict]:
    """``({set: its JSON}, package info)`` from the pinned npm package or ``source`` (folder or .tgz)."""
    wanted = {f"{s}.json": s for s in sets}
    data: dict[str, dict] = {}
    package: dict = {}
    if source is None or (source.is_file() and tarfile.is_tarfile(source)):
        tgz = _pinned_tgz(cache, verbose) if source is None else source
        note(f"emoji: reading {len(sets)} icon sets from {tgz}", verbose)
        with tarfile.open(tgz) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile():
                    continue
                if parts[-2:-1] == ["json"] and parts[-1] in wanted:
                    data[wanted[parts[-1]]] = json.load(tar.extractfile(member))
                elif parts[-1] == "package.json" and len(parts) <= 2:
                    package = json.load(tar.extractfile(member))
        origin = {"how": f"npm pack {ICONIFY_PACKAGE}@{ICONIFY_VERSION}" if source is None else f"--source {source}",
                  "tarball": tgz.name, "tarball_sha256": file_sha256(tgz)}
    elif source.is_dir():
        base = next((b for b in (source, source / "package") if (b / "json").is_dir()), None)
        if base is None:
            raise BuildError(f"--source {source} has no json/ folder; expected the {ICONIFY_PACKAGE} package "
                             "unpacked (json/<set>.json) or its .tgz")
        for s in sets:
            if (base / "json" / f"{s}.json").is_file():
                data[s] = json.loads((base / "json" / f"{s}.json").read_text(encoding="utf-8"))
        if (base / "package.json").is_file():
            package = json.loads((base / "package.json").read_text(encoding="utf-8"))
        origin = {"how": f"--source {source}"}
    else:
        what = "does not exist" if not source.exists() else "is neither a folder nor a .tgz"
        raise BuildError(f"--source {source} {what}; expected the {ICONIFY_PACKAGE} package unpacked "
                         "(json/<set>.json) or its .tgz")
    missing = [s for s in sets if s not in data]
    if missing:
        raise BuildError(f"{origin['how']} has no icon set {', '.join(missing)} (json/<set>.json); pass "
                         "--sets with the sets it has")
    info = {"package": package.get("name", ICONIFY_PACKAGE), "version": package.get("version"), **origin}
    return data, info


# ---- icons and their sequences ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Icon:
    """One drawable icon of a set (an alias resolved to its parent's body with its own transformations)."""

    set: str
    name: str
    body: str
    left: float
    top: float
    width: float
    height: float
    rotate: int = 0
    hflip: bool = False
    vflip: bool = False
    hidden: bool = False
    alias: bool = False


def resolve_icons(prefix: str, js: dict) -> dict[str, Icon]:
    """Every icon and alias of a set, aliases resolved (chains followed, flips xor-ed, rotations added)."""
    default = {"left": js.get("left", 0), "top": js.get("top", 0), "width": js.get("width", 16),
               "height": js.get("height", 16)}
    icons, aliases = js.get("icons", {}), js.get("aliases", {})

    def get(name: str, depth: int = 0) -> dict | None:
        if name in icons:
            d = icons[name]
            return {**default, **{k: d[k] for k in ("left", "top", "width", "height") if k in d},
                    "body": d["body"], "rotate": d.get("rotate", 0) % 4, "hFlip": bool(d.get("hFlip")),
                    "vFlip": bool(d.get("vFlip")), "hidden": bool(d.get("hidden")), "alias": False}
        if name not in aliases or depth > 8:
            return None
        a = aliases[name]
        parent = get(a.get("parent", ""), depth + 1)
        if parent is None:
            return None
        out = {**parent, **{k: a[k] for k in ("left", "top", "width", "height") if k in a}, "alias": True}
        out["rotate"] = (parent["rotate"] + a.get("rotate", 0)) % 4
        out["hFlip"] = parent["hFlip"] != bool(a.get("hFlip"))
        out["vFlip"] = parent["vFlip"] != bool(a.get("vFlip"))
        out["hidden"] = bool(a.get("hidden", parent["hidden"]))
        return out

    resolved = {}
    for name in sorted(set(icons) | set(aliases)):
        d = get(name)
        if d is not None:
            resolved[name] = Icon(prefix, name, d["body"], float(d["left"]), float(d["top"]), float(d["width"]),
                                  float(d["height"]), d["rotate"], d["hFlip"], d["vFlip"], d["hidden"], d["alias"])
    return resolved


def parse_sequence(key: str) -> tuple[int, ...] | None:
    """``"2764-fe0f"`` -> ``(0x2764,)``: codepoints without variation selectors; None if not hex."""
    try:
        cps = [int(part, 16) for part in key.split("-")]
    except ValueError:
        return None
    seq = tuple(c for c in cps if c not in VARIATION_SELECTORS)
    return seq or None


def _private(seq: tuple[int, ...]) -> bool:
    return any(0xE000 <= c <= 0xF8FF or c >= 0xF0000 for c in seq)


def _compact(name: str) -> str:
    return re.sub(r"[\s\-_]", "", name.lower())


def _unicode_names() -> dict[str, tuple[int, ...]]:
    """Compact Unicode character names of the symbol / pictograph blocks -> codepoint (``compact-name``)."""
    table: dict[str, tuple[int, ...]] = {}
    for cp in [*range(0x2000, 0x3300), *range(0x1F000, 0x1FB00)]:
        name = unicodedata.name(chr(cp), "")
        if name:
            table.setdefault(_compact(name), (cp,))
    return table


def map_icons(sets: dict[str, dict]) -> tuple[dict[tuple[int, ...], dict[str, tuple[Icon, str]]], dict]:
    """``({sequence: {set: (icon, rule)}}, counts)``: each icon's sequence by the first rule of ``MAPPINGS``
    that finds one (module docstring); counts per set: mapped by each rule, skin tones, unmapped."""
    resolved = {s: resolve_icons(s, js) for s, js in sets.items()}
    own: dict[str, dict[str, tuple[int, ...]]] = {}
    for s, js in sets.items():  # name -> sequence from each set's chars table
        table: dict[str, tuple[int, ...]] = {}
        for key in sorted(js.get("chars", {})):
            seq = parse_sequence(key)
            if seq is not None and not _private(seq):
                table.setdefault(js["chars"][key], seq)
        own[s] = table
    by_name: dict[str, tuple[int, ...]] = {}
    by_alias: dict[str, tuple[int, ...]] = {}
    for s in sets:  # in the given set order: the first set's name wins (no conflicts with @iconify/json)
        for name, seq in own[s].items():
            by_name.setdefault(name, seq)
        for name, a in sorted(sets[s].get("aliases", {}).items()):
            if set(a) == {"parent"} and a["parent"] in own[s]:
                by_alias.setdefault(name, own[s][a["parent"]])
    compact = {_compact(n): q for n, q in by_name.items()}
    for n, q in _unicode_names().items():
        compact.setdefault(n, q)

    def lookup(s: str, name: str) -> tuple[tuple[int, ...] | None, str]:
        if name in own[s]:
            return own[s][name], "chars"
        if name in by_name:
            return by_name[name], "name"
        if name in by_alias:
            return by_alias[name], "alias"
        try:  # case-insensitive; named sequences give several codepoints
            return tuple(map(ord, unicodedata.lookup(name.replace("-", " ")))), "unicode-name"
        except KeyError:
            pass
        m = re.fullmatch(r"flag-for-(?:flag-)?(.+)", name)
        if m and f"flag-{m.group(1)}" in by_name:
            return by_name[f"flag-{m.group(1)}"], "flag-name"
        if "-" not in name and _compact(name) in compact:
            return compact[_compact(name)], "compact-name"
        m = re.fullmatch(r"(.+)-(\d+)", name)
        if m:
            seq, _ = lookup(s, m.group(1))
            if seq is not None:
                return seq, "numbered-name"
        return None, ""

    def rank(icon: Icon, rule: str) -> tuple:
        m = re.fullmatch(r".+-(\d+)", icon.name)
        return MAPPINGS.index(rule), icon.hidden, icon.alias, int(m.group(1)) if m and rule == "numbered-name" else 0, icon.name

    classes: dict[tuple[int, ...], dict[str, tuple[Icon, str]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for s in sets:
        c = counts[s] = {r: 0 for r in MAPPINGS} | {"skin-tone": 0, "private-use": 0, "unmapped": 0}
        for name, icon in resolved[s].items():
            seq, rule = lookup(s, name)
            if seq is None:
                c["unmapped"] += 1
                continue
            c[rule] += 1
            if _private(seq):
                c["private-use"] += 1
                continue
            if any(cp in SKIN_TONES for cp in seq):
                c["skin-tone"] += 1
                continue
            designs = classes.setdefault(seq, {})
            if s not in designs or rank(icon, rule) < rank(*designs[s]):
                designs[s] = (icon, rule)
    return classes, counts


def select(classes: dict, min_designs: int, max_classes: int | None) -> list[tuple[int, ...]]:
    """Sequences with >= ``min_designs`` designs; with ``max_classes``, those with the most designs (ties:
    lowest sequence); returned in sequence order."""
    ok = [seq for seq, d in classes.items() if len(d) >= min_designs]
    if max_classes is not None:
        ok = sorted(ok, key=lambda q: (-len(classes[q]), q))[:max_classes]
    return sorted(ok)


def class_name(seq: tuple[int, ...], designs: dict[str, tuple[Icon, str]], set_order: tuple[str, ...]) -> str:
    """``<cp>-<cp>..._<name>``: 5-hex-digit codepoints (sortable) and the icon name of the first set (in
    ``set_order``) that maps it through its own ``chars`` table, else by the earliest rule."""
    best = min(designs.items(), key=lambda kv: (kv[1][1] != "chars", set_order.index(kv[0])))
    slug = re.sub(r"[^a-z0-9]+", "-", best[1][0].name.lower()).strip("-")
    slug = re.sub(r"-\d+$", "", slug) if best[1][1] == "numbered-name" else slug
    return "-".join(f"{c:05x}" for c in seq) + "_" + slug[:48].rstrip("-")


def sequence_text(seq: tuple[int, ...]) -> str:
    return " ".join(f"U+{c:04X}" for c in seq)


# ---- rendering --------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:g}"


def icon_svg(icon: Icon, size: int) -> str:
    """A standalone SVG of ``icon`` at ``size`` x ``size`` px (iconify's iconToSVG transformations: a flip
    about the view box, rotations by quarter turns about its centre; the view box fitted and centred)."""
    left, top, width, height = icon.left, icon.top, icon.width, icon.height
    rotate, transforms = icon.rotate, []
    if icon.hflip and icon.vflip:
        rotate += 2
    elif icon.hflip:
        transforms += [f"translate({_num(width + left)} {_num(-top)})", "scale(-1 1)"]
        top = left = 0.0
    elif icon.vflip:
        transforms += [f"translate({_num(-left)} {_num(height + top)})", "scale(1 -1)"]
        top = left = 0.0
    rotate %= 4
    if rotate == 1:
        c = height / 2 + top
        transforms.insert(0, f"rotate(90 {_num(c)} {_num(c)})")
    elif rotate == 2:
        transforms.insert(0, f"rotate(180 {_num(width / 2 + left)} {_num(height / 2 + top)})")
    elif rotate == 3:
        c = width / 2 + left
        transforms.insert(0, f"rotate(-90 {_num(c)} {_num(c)})")
    if rotate % 2 == 1:
        left, top, width, height = top, left, height, width
    body = f'<g transform="{" ".join(transforms)}">{icon.body}</g>' if transforms else icon.body
    return ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{size}" height="{size}" viewBox="{_num(left)} {_num(top)} {_num(width)} {_num(height)}">'
            f"{body}</svg>")


def require_resvg():
    try:
        import resvg_py
    except ImportError:
        raise BuildError(f"the emoji builder renders SVG with the Python package resvg-py, which is not "
                         f"installed; run {INSTALL_HINT}") from None
    return resvg_py


def render(icon: Icon, size: int):
    """``icon`` as a PIL RGBA image of ``size`` x ``size``."""
    import io

    from PIL import Image

    resvg = require_resvg()
    try:
        png = resvg.svg_to_bytes(svg_string=icon_svg(icon, size), width=size, height=size, skip_system_fonts=True)
    except (ValueError, RuntimeError) as e:
        raise BuildError(f"resvg cannot render icon {icon.set}:{icon.name}: {e}") from None
    with Image.open(io.BytesIO(bytes(png))) as im:
        im = im.convert("RGBA")
    if im.size != (size, size):  # resvg honours width/height; anything else is a bug worth stopping on
        raise BuildError(f"resvg drew {icon.set}:{icon.name} at {im.size}, expected {size} x {size}")
    return im


# ---- the build -------------------------------------------------------------------------------------------
def build(data_dir: Path, *, classes: int | None = None, size: int = DEFAULT_SIZE,
          min_designs: int = DEFAULT_MIN_DESIGNS, sets: tuple[str, ...] = EMOJI_SETS, source: Path | None = None,
          force: bool = False, name: str = "emoji", verbose: bool = True) -> Path:
    """Write the emoji set into ``data_dir / name`` (module docstring); returns that folder."""
    check_build_options(classes, size, min_designs, "--min-designs")
    sets = tuple(sets)
    if not sets or len(set(sets)) != len(sets):
        raise ConfigError(f"--sets must name distinct icon sets, got {','.join(sets)}")
    data_dir = Path(data_dir)
    check_target(data_dir / name, force)
    require_resvg()
    js, package = read_source(None if source is None else Path(source), sets, data_dir / ".cache" / "emoji", verbose)
    mapped, counts = map_icons(js)
    chosen = select(mapped, min_designs, classes)
    if len(chosen) < 2:
        raise BuildError(f"only {len(chosen)} emoji have at least {min_designs} designs in the sets "
                         f"{', '.join(sets)}; lower --min-designs or add sets")
    total = sum(len(mapped[q]) for q in chosen)
    note(f"emoji: {len(chosen)} classes, {total} images of {size} px from {len(sets)} sets", verbose)
    rows = []
    with staged_dir(data_dir, name, force) as out:
        bar = Progress(total, "emoji: rendering", enabled=verbose)
        for seq in chosen:
            designs = mapped[seq]
            folder = class_name(seq, designs, sets)
            (out / folder).mkdir()
            for s in sorted(designs):
                render(designs[s][0], size).save(out / folder / f"{s}.png", format="PNG", compress_level=6)
                bar.update()
            rows.append({"folder": folder, "sequence": sequence_text(seq),
                         "text": "".join(map(chr, seq)) if len(seq) > 1 else chr(seq[0]),
                         "designs": {s: designs[s][0].name for s in sorted(designs)}})
        bar.close()
        per_set = {}
        for s in sets:
            info = js[s].get("info", {})
            per_set[s] = {"name": info.get("name"), "version": info.get("version"), "author": info.get("author"),
                          "license": info.get("license"), "designs_used": sum(s in mapped[q] for q in chosen),
                          "mapped_by": {k: v for k, v in counts[s].items() if v}}
        manifest = {
            "builder": "ddtas_lightning.data.builders.emoji", "builder_version": BUILDER_VERSION,
            "command": f"{PREPARE} emoji", "arguments": {
                "classes": classes, "size": size, "min_designs": min_designs, "sets": list(sets),
                "source": None if source is None else str(source)},
            "source": package, "sets": per_set,
            "image": {"format": "PNG", "mode": "RGBA", "size": [size, size],
                      "note": "transparent; composited onto dataset.source.background when read"},
            "num_classes": len(rows), "num_images": total,
            "images_per_class": count_stats(len(r["designs"]) for r in rows),
            "content_hash": content_hash(out), "classes": rows,
        }
        write_manifest(out, manifest)
    note(f"emoji: wrote {total} images of {len(rows)} classes into {data_dir / name} ({manifest['content_hash']})",
         verbose)
    return data_dir / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PREPARE} emoji", description="Build the emoji set (one class per emoji, one image per vendor "
        f"design) from the npm package {ICONIFY_PACKAGE}@{ICONIFY_VERSION}; see docs/real_data.md.")
    parser.add_argument("--classes", type=int, default=None, help="at most N classes (those with the most "
                        "designs); default: every emoji with --min-designs designs")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in px (default {DEFAULT_SIZE})")
    parser.add_argument("--min-designs", type=int, default=DEFAULT_MIN_DESIGNS,
                        help=f"keep emoji drawn by at least this many sets (default {DEFAULT_MIN_DESIGNS})")
    parser.add_argument("--sets", default=",".join(EMOJI_SETS), help="comma-separated icon sets (default: the "
                        "12 emoji sets)")
    add_output_options(parser, "emoji", f"{ICONIFY_PACKAGE} unpacked (a folder with json/) or its .tgz, "
                       "instead of npm pack")
    args = parser.parse_args(argv)
    return run_and_report(
        lambda: build(args.data_dir, classes=args.classes, size=args.size, min_designs=args.min_designs,
                      sets=tuple(s.strip() for s in args.sets.split(",") if s.strip()), source=args.source,
                      force=args.force, name=args.name, verbose=not args.quiet),
        "emoji", args.data_dir, (BuildError, ConfigError, OSError))


if __name__ == "__main__":
    sys.exit(main())
