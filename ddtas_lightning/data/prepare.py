"""Check a downloaded dataset against what its loader expects, and put it where the configs look for it.

    python -m ddtas_lightning.data.prepare cub200|cars196|sop|inshop SOURCE [SOURCE ...] [--data-dir data]
        [--force] [--copy] [--max-unpacked-gib 64] [--max-ratio 100]

Each SOURCE is an archive (.tgz / .tar.gz / .tar / .zip), a folder, or a single file (e.g. Cars196's
``cars_annos.mat`` next to ``car_ims.tgz``; In-Shop's ``list_eval_partition.txt`` next to ``img.zip``).

1. Before anything is unpacked, the sources' file names are checked for the files the loader reads
   (``REQUIRED``); a missing one is named, with the archive's top-level entries, and nothing is written.
2. Archives are unpacked into ``<data-dir>/.<target>.partial``, member by member and checked here (not
   by tarfile's filters): only regular files and folders (a symlink, hard link, device or FIFO member is
   refused), every path must stay inside the folder (no absolute names, no ``..``), and the expanded size
   is capped (``--max-unpacked-gib``, default 64; ``--max-ratio``, default 100 times the archive's size
   beyond 50 MiB), from the headers before writing and again while writing. A truncated or corrupt
   archive is one error. Files are copied, and the dataset folder found inside is assembled there.
3. The loader itself (``data/cub200.py`` etc.) then reads the staged tree with ``check_images=True``:
   every listed image must exist (the first missing ones are named, with the count), every listed path
   must stay inside the dataset root, and the split counts are compared with the published ones.
4. Only then does the tree become ``<data-dir>/<target>`` (the ``root`` of ``conf/dataset/<name>.yaml``),
   by a rename; ``--force`` replaces an existing tree at that moment, so a failed ``--force`` leaves the
   old one as it was. A folder source that holds the whole dataset is validated where it is and linked
   there instead (``--copy`` copies it).

Exit status 0 when the dataset is ready, 2 (one ``error:`` line) otherwise.

Two sets are built rather than unpacked, from registry packages (``data/builders/``, docs/real_data.md)::

    python -m ddtas_lightning.data.prepare emoji [--classes N] [--size PX] [--data-dir data] [--source PATH]
    python -m ddtas_lightning.data.prepare cjk_fonts [--classes N] [--size PX] [--data-dir data] [--source PATH]
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import shutil
import stat
import sys
import tarfile
import zipfile
import zlib
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
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                return [n for n in z.namelist()]
        if kind == "tar":
            with tarfile.open(path) as t:
                return [m.name + ("/" if m.isdir() else "") for m in t.getmembers()]
    except ARCHIVE_ERRORS as e:  # a truncated download: one line, before anything is written
        raise _corrupt(path, e) from None
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
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one archive may expand to: ``max_bytes`` in all, and at most ``max_ratio`` times the archive's
    own size once it expands to more than ``ratio_floor`` bytes (a zip bomb: kilobytes of zeros that
    expand to terabytes). Checked from the headers before anything is written, and again while writing
    (headers can lie)."""

    max_bytes: int = 64 * GIB
    max_ratio: float = 100.0
    ratio_floor: int = 50 * MIB


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB" if n >= MIB // 10 else f"{n / 1024:.1f} KiB"


class _Budget:
    """The running total of one archive's expanded bytes against :class:`Limits`."""

    def __init__(self, source: Path, limits: Limits) -> None:
        self.source, self.limits, self.total = source, limits, 0
        self.archive_size = max(1, source.stat().st_size)

    def check(self, total: int, what: str) -> None:
        lim = self.limits
        if total > lim.max_bytes:
            raise DatasetLayoutError(
                f"{self.source}: {what} {_size(total)}, more than the limit of {_size(lim.max_bytes)}; refused (a "
                "decompression bomb?). Raise it with --max-unpacked-gib if the archive is genuine")
        if total > lim.ratio_floor and total > lim.max_ratio * self.archive_size:
            raise DatasetLayoutError(
                f"{self.source}: {what} {_size(total)} from a {_size(self.archive_size)} archive, a ratio of "
                f"{total / self.archive_size:.0f} (limit {lim.max_ratio:g} beyond {_size(lim.ratio_floor)}); refused "
                "(a decompression bomb?). Raise it with --max-ratio if the archive is genuine")

    def add(self, n: int) -> None:
        self.total += n
        self.check(self.total, "expands to more than")


def _member_target(source: Path, dest: Path, name: str) -> Path:
    """The path member ``name`` of ``source`` is written to, checked to stay inside ``dest`` by its name
    (no absolute path, no ``..``) and by the resolved path of its folder (no symlink on the way: nothing
    extracted here is a link, and ``dest`` is a fresh staging folder)."""
    clean = name.replace("\\", "/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if "\0" in name or clean.startswith("/") or (len(clean) > 1 and clean[1] == ":") or ".." in parts or not parts:
        raise DatasetLayoutError(f"{source}: member {name!r} would be written outside {dest}; refused (expected "
                                 "relative member names without '..')")
    target = dest.joinpath(*parts)
    real_dest = Path(os.path.realpath(dest))
    real_parent = Path(os.path.realpath(target.parent))
    if not (real_parent == real_dest or real_parent.is_relative_to(real_dest)):
        raise DatasetLayoutError(f"{source}: member {name!r} would be written outside {dest} (through "
                                 f"{real_parent}); refused")
    return target


def _write_member(stream, target: Path, size: int, budget: _Budget, source: Path, name: str) -> None:
    """Copy ``stream`` into a new regular file ``target`` (never through an existing link), counting the
    bytes against ``budget`` and the member's announced ``size``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            raise DatasetLayoutError(f"{source}: member {name!r} is a file and a folder; refused")
        target.unlink()  # a later member of the same name replaces the earlier one (as tar does)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(MIB):
            written += len(chunk)
            if written > size:
                raise DatasetLayoutError(f"{source}: member {name!r} holds more than the {size} bytes its header "
                                         "announces; refused (a forged archive?)")
            budget.add(len(chunk))
            out.write(chunk)


ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, lzma.LZMAError,
                  gzip.BadGzipFile, NotImplementedError)


def _corrupt(source: Path, e: BaseException, done: int | None = None) -> DatasetLayoutError:
    where = f" after {done} members" if done else ""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return DatasetLayoutError(f"{source}: the archive is truncated or corrupt{where} ({type(e).__name__}"
                              f"{': ' + text if text else ''}); download it again (nothing was installed)")


def _extract(source: Path, dest: Path, limits: Limits, open_archive, members) -> None:
    """What both archive kinds share: ``members(archive, budget)`` (``archive = open_archive(source)``) checks
    the announced total against ``budget`` and yields ``(name, is_dir, size, open_stream)`` for each member
    in order, refusing a link member when it comes to it; each is checked to stay inside ``dest`` and written
    there (folders made, files copied against ``budget``). A truncated or corrupt archive is one error."""
    budget = _Budget(source, limits)
    done = 0
    try:
        with open_archive(source) as archive:
            for name, is_dir, size, open_stream in members(archive, budget):
                target = _member_target(source, dest, name)
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    with open_stream() as stream:
                        _write_member(stream, target, size, budget, source, name)
                done += 1
    except ARCHIVE_ERRORS as e:
        raise _corrupt(source, e, done) from None


def _extract_tar(source: Path, dest: Path, limits: Limits) -> None:
    """Regular files and folders only: symlinks, hard links, devices and FIFOs are refused (a link would let a
    later member write through it; CVE-2025-4517 chained symlinks past tarfile's own ``data`` filter), and
    every path is checked here, not by tarfile."""

    def members(t: tarfile.TarFile, budget: _Budget):
        infos = t.getmembers()  # reads every header first: sizes are checked before writing
        budget.check(sum(m.size for m in infos if m.isreg()), "announces")
        for m in infos:
            if not (m.isreg() or m.isdir()):
                kind = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else
                        "a device file" if m.ischr() or m.isblk() else "a FIFO" if m.isfifo() else
                        f"of type {m.type!r}")
                link = f" to {m.linkname!r}" if m.issym() or m.islnk() else ""
                raise DatasetLayoutError(f"{source}: member {m.name!r} is {kind}{link}; refused (a dataset "
                                         "archive holds only files and folders)")
            yield m.name, m.isdir(), m.size, lambda m=m: t.extractfile(m)

    _extract(source, dest, limits, tarfile.open, members)


def _extract_zip(source: Path, dest: Path, limits: Limits) -> None:
    def members(z: zipfile.ZipFile, budget: _Budget):
        infos = z.infolist()
        budget.check(sum(i.file_size for i in infos), "announces")
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetLayoutError(f"{source}: member {info.filename!r} is a symbolic link; refused (a "
                                         "dataset archive holds only files and folders)")
            yield info.filename, info.is_dir(), info.file_size, lambda info=info: z.open(info)

    _extract(source, dest, limits, zipfile.ZipFile, members)


def unpack(source: Path, dest: Path, limits: Limits | None = None) -> None:
    """Archive -> extracted into ``dest``; folder -> its contents copied; file -> copied into ``dest``."""
    kind = archive_kind(source)
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "tar":
        _extract_tar(source, dest, limits or Limits())
    elif kind == "zip":
        _extract_zip(source, dest, limits or Limits())
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


def prepare(name: str, sources: list[Path], data_dir: Path, *, force: bool = False, copy: bool = False,
            limits: Limits | None = None) -> Path:
    """Check ``sources``, assemble ``data_dir / SPECS[name].target`` and validate it; returns that path.

    The tree is assembled and validated in ``<data_dir>/.<target>.partial`` and only then moved into
    place; with ``force`` an existing tree is replaced at that moment (renamed aside, the new one renamed
    in, the old one deleted), so a ``--force`` whose new download is broken leaves the old tree as it was."""
    if name not in SPECS:
        raise DatasetLayoutError(f"unknown dataset {name!r}; one of: {', '.join(SPECS)}")
    spec = SPECS[name]
    target = data_dir / spec.target
    if (target.exists() or target.is_symlink()) and not force:
        raise DatasetLayoutError(f"{target} already exists; check it with `python -m "
                                 f"ddtas_lightning.data.prepare {name} {target}` or pass --force to replace it")
    listings = {src: list_names(src) for src in sources}
    staging = data_dir / f".{spec.target}.partial"
    # one folder source holding the whole dataset: validate it where it is and link (or copy) it
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
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            staged = staging / "root"
            if copy:
                shutil.copytree(root, staged)
                _validate_staged(name, staged, target)
            else:
                validate(name, root)
                os.symlink(root, staged, target_is_directory=True)
            _install(staged, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"{'copied' if copy else 'linked'} {target} -> {root}")
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
    shutil.rmtree(staging, ignore_errors=True)
    try:
        assembled = staging / "root"
        assembled.mkdir(parents=True)
        for src in sources:
            if archive_kind(src):
                raw = staging / "raw"
                shutil.rmtree(raw, ignore_errors=True)
                unpack(src, raw, limits)
                _merge(raw / roots[src] if roots[src] else raw, assembled)
            elif src.is_dir():  # copied: the user's folder is left as it is
                shutil.copytree(src / (roots[src] or ""), assembled, dirs_exist_ok=True)
            else:
                shutil.copy2(src, assembled / src.name)
        _validate_staged(name, assembled, target)
        _install(assembled, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"unpacked {', '.join(s.name for s in sources)} into {target}")
    return target


def _validate_staged(name: str, staged: Path, target: Path) -> dict[str, int]:
    """:func:`validate` on the staged tree; its error says that nothing was installed."""
    try:
        return validate(name, staged)
    except DatasetLayoutError as e:
        keep = f"; {target} is left as it was" if target.exists() or target.is_symlink() else ""
        raise DatasetLayoutError(f"{e} (checked in the staging folder {staged}, now removed: nothing was "
                                 f"installed{keep})") from None


def _install(staged: Path, target: Path) -> None:
    """Rename ``staged`` to ``target``; an existing ``target`` is renamed aside first and deleted only after
    the new tree is in place (put back if the rename fails)."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        if old.is_symlink() or old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


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
    from ddtas_lightning.data.builders import BUILDERS, run_builder  # standard library only
    from ddtas_lightning.data.builders.common import run_and_report

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BUILDERS:  # emoji / cjk_fonts: built from registry packages, own options
        return run_builder(argv[0], argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m ddtas_lightning.data.prepare", description=__doc__.split("\n\n")[0],
        epilog=f"{' / '.join(sorted(BUILDERS))}: built from registry packages, with their own options "
               "(python -m ddtas_lightning.data.prepare emoji --help)")
    parser.add_argument("dataset", choices=sorted(SPECS) + sorted(BUILDERS))
    parser.add_argument("sources", nargs="+", type=Path, help="archives, folders or files of the download")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the configs look (paths.data_dir)")
    parser.add_argument("--force", action="store_true", help="replace an existing <data-dir>/<dataset folder>")
    parser.add_argument("--copy", action="store_true", help="copy a folder source instead of linking it")
    parser.add_argument("--max-unpacked-gib", type=float, default=Limits.max_bytes / GIB,
                        help="refuse an archive that expands to more than this (default %(default)g GiB)")
    parser.add_argument("--max-ratio", type=float, default=Limits.max_ratio,
                        help="refuse an archive that expands to more than this many times its size, beyond "
                             f"{Limits.ratio_floor // MIB} MiB (default %(default)g; images compress about 1:1)")
    args = parser.parse_args(argv)
    if not args.max_unpacked_gib > 0 or not args.max_ratio > 0:
        parser.error("--max-unpacked-gib and --max-ratio must be > 0")
    limits = Limits(max_bytes=int(args.max_unpacked_gib * GIB), max_ratio=args.max_ratio)
    return run_and_report(
        lambda: prepare(args.dataset, args.sources, args.data_dir, force=args.force, copy=args.copy, limits=limits),
        args.dataset, args.data_dir, (DatasetLayoutError, OSError))


if __name__ == "__main__":
    sys.exit(main())
