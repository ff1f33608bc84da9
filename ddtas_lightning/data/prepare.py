"""Check a downloaded dataset against what its loader expects, and put it where the configs look for it.

    python -m ddtas_lightning.data.prepare cub200|cars196|sop|inshop SOURCE [SOURCE ...] [--data-dir data]

Each SOURCE is an archive (.tgz / .tar.gz / .tar / .zip), a folder, or a single file (e.g. Cars196's
``cars_annos.mat`` next to ``car_ims.tgz``; In-Shop's ``list_eval_partition.txt`` next to ``img.zip``).

1. Before anything is unpacked, the sources' file names are checked for the files the loader reads
   (``REQUIRED``); a missing one is named, with the archive's top-level entries, and nothing is written.
2. Archives are unpacked into ``<data-dir>/.<target>.partial`` (tar with the ``data`` filter: no absolute
   paths, links or device files leaving the folder; zip members are checked the same way), files are
   copied, and the dataset folder found inside becomes ``<data-dir>/<target>`` (the ``root`` of
   ``conf/dataset/<name>.yaml``). A folder source that holds the whole dataset is linked there instead
   (``--copy`` copies it).
3. The loader itself (``data/cub200.py`` etc.) then reads the tree with ``check_images=True``: every
   listed image must exist (the first missing ones are named, with the count), and the split counts are
   compared with the published ones.

Exit status 0 when the dataset is ready, 2 (one ``error:`` line) otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ddtas_lightning.data.records import DatasetLayoutError


@dataclass(frozen=True)
class Spec:
    loader: str          # "module:Class" of the loader
    target: str          # folder name under data/ (conf/dataset/<name>.yaml's root)
    marker: str          # a file whose folder is the dataset root
    required: tuple[str, ...]  # paths relative to the root ('/' at the end: a folder with files)
    marker_parents: tuple[str, ...] = ()  # folders the marker may sit in below the root (In-Shop: Eval/)


SPECS = {
    "cub200": Spec("ddtas_lightning.data.cub200:CUB200", "CUB_200_2011", "images.txt",
                   ("images.txt", "image_class_labels.txt", "classes.txt", "images/")),
    "cars196": Spec("ddtas_lightning.data.cars196:Cars196", "cars196", "cars_annos.mat",
                    ("cars_annos.mat", "car_ims/")),
    "sop": Spec("ddtas_lightning.data.sop:SOP", "Stanford_Online_Products", "Ebay_train.txt",
                ("Ebay_train.txt", "Ebay_test.txt")),
    "inshop": Spec("ddtas_lightning.data.inshop:InShop", "inshop", "list_eval_partition.txt",
                   ("list_eval_partition.txt", "img/"), marker_parents=("Eval",)),
}


# ---- listing the sources -----------------------------------------------------------------------------
def archive_kind(path: Path) -> str | None:
    if path.is_file() and zipfile.is_zipfile(path):
        return "zip"
    if path.is_file() and tarfile.is_tarfile(path):
        return "tar"
    return None


def list_names(path: Path) -> list[str]:
    """POSIX relative names of every file (and folder, with a trailing '/') a source provides."""
    kind = archive_kind(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as z:
            return [n for n in z.namelist()]
    if kind == "tar":
        with tarfile.open(path) as t:
            return [m.name + ("/" if m.isdir() else "") for m in t.getmembers()]
    if path.is_dir():
        return [p.relative_to(path).as_posix() + ("/" if p.is_dir() else "") for p in path.rglob("*")]
    if path.is_file():
        return [path.name]
    raise DatasetLayoutError(f"source {path} does not exist")


def _norm(name: str) -> str:
    return str(PurePosixPath(name.lstrip("./"))) + ("/" if name.endswith("/") else "")


def find_root(names: list[str], spec: Spec) -> str | None:
    """The prefix ('' or 'a/b/') of the dataset root inside a listing, from its marker file (shallowest)."""
    hits = sorted((n for n in map(_norm, names) if PurePosixPath(n).name == spec.marker),
                  key=lambda n: n.count("/"))
    for hit in hits:
        parent = PurePosixPath(hit).parent
        if parent.name in spec.marker_parents:
            parent = parent.parent
        return "" if str(parent) == "." else f"{parent}/"
    return None


def missing_required(names: set[str], spec: Spec, root: str) -> list[str]:
    """Entries of ``spec.required`` that the listing lacks below ``root`` (a folder needs a file inside)."""
    missing = []
    for req in spec.required:
        if req.endswith("/"):
            if not any(n.startswith(root + req) and not n.endswith("/") for n in names):
                missing.append(req + " (a folder with the images)")
        elif not any(n in (root + req, *(f"{root}{p}/{req}" for p in spec.marker_parents)) for n in names):
            missing.append(req)
    return missing


# ---- unpacking ---------------------------------------------------------------------------------------
def _safe_zip_extract(path: Path, dest: Path) -> None:
    dest_real = dest.resolve()
    with zipfile.ZipFile(path) as z:
        for member in z.infolist():
            target = (dest / member.filename).resolve()
            if not target.is_relative_to(dest_real):
                raise DatasetLayoutError(f"{path}: member {member.filename!r} would be written outside {dest}")
        z.extractall(dest)


def unpack(source: Path, dest: Path) -> None:
    """Archive -> extracted into ``dest``; folder -> its contents copied; file -> copied into ``dest``."""
    kind = archive_kind(source)
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "tar":
        with tarfile.open(source) as t:
            try:
                t.extractall(dest, filter="data")
            except tarfile.FilterError as e:
                raise DatasetLayoutError(f"{source}: unsafe member refused ({e})") from None
    elif kind == "zip":
        _safe_zip_extract(source, dest)
    elif source.is_dir():
        shutil.copytree(source, dest / source.name, dirs_exist_ok=True)
    else:
        shutil.copy2(source, dest / source.name)


def _loader(spec: Spec):
    import importlib

    module, cls = spec.loader.split(":")
    return getattr(importlib.import_module(module), cls)


def validate(name: str, root: Path) -> dict[str, int]:
    """Load both splits with the dataset's own loader (every image checked); returns the split counts.
    Counts differing from the published ones are printed (a subset or another release)."""
    spec = SPECS[name]
    source = _loader(spec)(root=root, check_images=True)
    counts: dict[str, int] = {}
    for split in ("train", "test"):
        records = source.load(split)
        if records.is_query is not None:  # In-Shop: query / gallery
            counts["query_images"] = sum(records.is_query)
            counts["gallery_images"] = sum(records.is_gallery)
        else:
            counts[f"{split}_images"] = len(records)
        counts[f"{split}_classes"] = records.num_classes
    expected = getattr(source, "expected_counts", {}) or {}
    differ = {k: (counts[k], v) for k, v in expected.items() if k in counts and counts[k] != v}
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if differ:
        print("note: counts differ from the published dataset (" + "; ".join(
            f"{k} {a}, published {e}" for k, (a, e) in differ.items()) + "): fine for a subset, not comparable "
            "with the papers' results")
    return counts


def prepare(name: str, sources: list[Path], data_dir: Path, *, force: bool = False, copy: bool = False) -> Path:
    """Check ``sources``, assemble ``data_dir / SPECS[name].target`` and validate it; returns that path."""
    if name not in SPECS:
        raise DatasetLayoutError(f"unknown dataset {name!r}; one of: {', '.join(SPECS)}")
    spec = SPECS[name]
    target = data_dir / spec.target
    if target.exists() or target.is_symlink():
        if not force:
            raise DatasetLayoutError(f"{target} already exists; check it with `python -m "
                                     f"ddtas_lightning.data.prepare {name} {target}` or pass --force to replace it")
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    listings = {src: list_names(src) for src in sources}
    # one folder source holding the whole dataset: validate it where it is and link it
    if len(sources) == 1 and sources[0].is_dir():
        root_prefix = find_root(listings[sources[0]], spec)
        if root_prefix is None:
            raise DatasetLayoutError(f"{sources[0]} holds no {spec.marker}; expected {', '.join(spec.required)} "
                                     f"in the {name} folder")
        missing = missing_required(set(map(_norm, listings[sources[0]])), spec, root_prefix)
        if missing:
            raise DatasetLayoutError(f"{sources[0] / root_prefix} lacks {', '.join(missing)} (the {name} loader "
                                     f"reads {', '.join(spec.required)})")
        root = (sources[0] / root_prefix).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copytree(root, target)
        else:
            os.symlink(root, target, target_is_directory=True)
        print(f"{'copied' if copy else 'linked'} {target} -> {root}")
        validate(name, target)
        return target
    # archives / files: the union of their names must hold the required files under one root
    combined: set[str] = set()
    roots = {}
    for src, names in listings.items():
        prefix = find_root(names, spec) if archive_kind(src) or src.is_dir() else None
        roots[src] = prefix
        strip = prefix or ""
        combined |= {n[len(strip):] for n in map(_norm, names) if n.startswith(strip)}
        if prefix is None and archive_kind(src):  # an archive with part of the dataset (e.g. car_ims.tgz)
            top = {n.split("/", 1)[0] + ("/" if "/" in n else "") for n in map(_norm, names)}
            roots[src] = _common_dataset_prefix(names, spec, top)
            combined |= {n[len(roots[src]):] for n in map(_norm, names) if n.startswith(roots[src])}
    missing = missing_required(combined, spec, "")
    if missing:
        tops = sorted({n.split("/", 1)[0] for names in listings.values() for n in map(_norm, names)})[:10]
        raise DatasetLayoutError(
            f"{name}: {', '.join(missing)} not found in {', '.join(str(s) for s in sources)} (top-level entries: "
            f"{', '.join(tops)}); the {name} loader reads {', '.join(spec.required)}. Nothing was written")
    staging = data_dir / f".{spec.target}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        assembled = staging / "root"
        assembled.mkdir(parents=True)
        for src in sources:
            if archive_kind(src):
                raw = staging / "raw"
                shutil.rmtree(raw, ignore_errors=True)
                unpack(src, raw)
                _merge(raw / roots[src] if roots[src] else raw, assembled)
            elif src.is_dir():
                _merge(src / (roots[src] or ""), assembled)
            else:
                shutil.copy2(src, assembled / src.name)
        assembled.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"unpacked {', '.join(s.name for s in sources)} into {target}")
    validate(name, target)
    return target


def _common_dataset_prefix(names: list[str], spec: Spec, top: set[str]) -> str:
    """For an archive without the marker: the prefix under which one of the required folders starts
    ('' when it is at the top, e.g. car_ims.tgz's 'car_ims/...')."""
    folders = [r for r in spec.required if r.endswith("/")]
    for n in sorted(map(_norm, names), key=lambda n: n.count("/")):
        for f in folders:
            i = n.find(f)
            if i == 0 or (i > 0 and n[i - 1] == "/"):
                return n[:i]
    return ""


def _merge(src: Path, dest: Path) -> None:
    for item in src.iterdir():
        target = dest / item.name
        if item.is_dir() and target.is_dir():
            _merge(item, target)
        else:
            shutil.move(str(item), str(target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddtas_lightning.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(SPECS))
    parser.add_argument("sources", nargs="+", type=Path, help="archives, folders or files of the download")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the configs look (paths.data_dir)")
    parser.add_argument("--force", action="store_true", help="replace an existing <data-dir>/<dataset folder>")
    parser.add_argument("--copy", action="store_true", help="copy a folder source instead of linking it")
    args = parser.parse_args(argv)
    try:
        target = prepare(args.dataset, args.sources, args.data_dir, force=args.force, copy=args.copy)
    except (DatasetLayoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ready: dataset={args.dataset} reads {target} (paths.data_dir={args.data_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
