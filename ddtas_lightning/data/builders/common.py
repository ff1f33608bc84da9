"""What the dataset builders share: one-line errors, external tools, the staged (atomic) write, the content
hash, the manifest, progress lines on stderr and the command-line conventions (option checks, the shared
options, the ``ready:`` / ``error:`` ending). Standard library only, but for the light ``config.validation``
(imported by ``prepare --help``)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ddtas_lightning.config.validation import ConfigError

MANIFEST = "manifest.json"
PREPARE = "python -m ddtas_lightning.data.prepare"


class BuildError(RuntimeError):
    """A builder cannot go on; ``prepare`` prints the message as one ``error:`` line and exits with 2."""


# ---- external tools ------------------------------------------------------------------------------------
def require_tool(name: str, why: str) -> str:
    """The path of the program ``name`` on PATH, else BuildError naming it and ``why`` it is needed."""
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} not found on PATH: {why}")
    return path


def run_tool(cmd: list[str], hint: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; a non-zero exit raises BuildError with the command, its exit code, the last line it
    printed on stderr (e.g. npm's ``404 Not Found``, apt's ``Unable to locate package``) and ``hint``."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        # the most telling line: the last error line if there is one (npm ends with a log-file note)
        errors = [ln for ln in lines if ln.startswith(("E:", "npm error 404", "npm ERR! 404", "npm error code",
                                                      "npm ERR! code", "dpkg-deb: error", "error"))]
        said = (errors or lines or ["no output"])[-1]
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {said}; {hint}")
    return proc


# ---- the staged write -----------------------------------------------------------------------------------
def check_target(target: Path, force: bool) -> None:
    """Refuse to build over an existing ``target`` unless ``force`` (checked before any download)."""
    if (target.exists() or target.is_symlink()) and not force:
        raise BuildError(f"{target} already exists; pass --force to replace it (it is kept until the new "
                         "set is complete)")


@contextlib.contextmanager
def staged_dir(data_dir: Path, name: str, force: bool) -> Iterator[Path]:
    """Yield ``<data_dir>/.<name>.partial`` (emptied first) to write into; on success it becomes
    ``<data_dir>/<name>`` (an existing set is replaced only then, and only with ``force``); on any
    failure, the partial folder is removed and an existing set is left untouched."""
    target = data_dir / name
    check_target(target, force)
    partial = data_dir / f".{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        check_target(target, force)  # something else may have created it meanwhile
        old = data_dir / f".{name}.old"
        if old.is_symlink() or old.is_file():
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
        moved = target.exists() or target.is_symlink()
        if moved:
            os.rename(target, old)  # aside, until the new set is in place
        try:
            os.rename(partial, target)
        except BaseException:
            if moved:
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if old.is_symlink() or old.is_file():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)


# ---- hashes and the manifest ----------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(root: Path, exclude: Iterable[str] = (MANIFEST,)) -> str:
    """``sha256:<hex>`` over every file below ``root`` but ``exclude``: the sorted lines
    ``<relative posix path>\\t<sha256 of the file>\\n``. Equal hashes = the same files, byte for byte."""
    skip = set(exclude)
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for rel in rels:
        if rel not in skip:
            h.update(f"{rel}\t{file_sha256(root / rel)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def count_stats(counts: Iterable[int]) -> dict:
    """min / max / mean and a histogram ``{value: how many}`` of per-class image counts."""
    counts = list(counts)
    hist = Counter(counts)
    return {"min": min(counts, default=0), "max": max(counts, default=0),
            "mean": round(sum(counts) / len(counts), 3) if counts else 0.0,
            "histogram": {str(k): hist[k] for k in sorted(hist)}}


def write_manifest(root: Path, manifest: dict) -> Path:
    """``manifest.json`` (UTF-8, keys in the given order, no timestamps: same inputs, same bytes)."""
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def class_folder_count(root: Path) -> int:
    return sum(1 for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


# ---- progress -------------------------------------------------------------------------------------------
class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, else one line per 10% (log files)."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True) -> None:
        self.total, self.label, self.done = max(0, total), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self.last = time.monotonic()
        self.next_tenth = 1

    def _line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self.t0
        eta = f", ~{elapsed / frac - elapsed:.0f} s left" if 0 < frac < 1 else ""
        if self.tty:
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            return f"{self.label} [{bar}] {self.done}/{self.total} ({elapsed:.0f} s{eta})"
        return f"{self.label}: {self.done}/{self.total} ({100 * frac:.0f}%, {elapsed:.0f} s{eta})"

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and (now - self.last > 0.2 or self.done >= self.total):
            self.stream.write("\r" + self._line())
            self.stream.flush()
            self.last = now
        elif not self.tty and self.total and self.done * 10 >= self.next_tenth * self.total:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self.next_tenth = self.done * 10 // self.total + 1

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()


def note(message: str, enabled: bool = True) -> None:
    """One progress / status line on stderr."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


# ---- the command line -----------------------------------------------------------------------------------
def check_build_options(classes: int | None, size: int, min_images: int, min_option: str) -> None:
    """The checks every builder makes before any download: ``--classes`` (None: all that qualify) and
    ``min_option`` (``--min-faces``, ``--min-designs``: images a class needs) at least 2, ``--size`` at
    least 8 px; ConfigError otherwise."""
    if classes is not None and classes < 2:
        raise ConfigError(f"--classes must be at least 2 (a class-disjoint split needs two), got {classes}")
    if size < 8:
        raise ConfigError(f"--size must be at least 8 px, got {size}")
    if min_images < 2:
        raise ConfigError(f"{min_option} must be at least 2 (a class needs two images), got {min_images}")


def add_output_options(parser: argparse.ArgumentParser, name: str, source_help: str) -> None:
    """The options every builder ends with: ``--data-dir``, ``--source`` (``source_help``), ``--name``
    (default ``name``), ``--force`` and ``--quiet``."""
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the configs look (paths.data_dir)")
    parser.add_argument("--source", type=Path, default=None, help=source_help)
    parser.add_argument("--name", default=name, help=f"folder name under --data-dir (default {name})")
    parser.add_argument("--force", action="store_true", help="replace an existing set (once the new one is complete)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_and_report(make: Callable[[], Path], dataset: str, data_dir: Path,
                   errors: tuple[type[BaseException], ...]) -> int:
    """How every ``prepare`` command ends: ``make()`` -> the dataset folder, then the ``ready:`` line on stdout
    and exit code 0; one of ``errors`` -> its message as one ``error:`` line on stderr and exit code 2."""
    try:
        target = make()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ready: dataset={dataset} reads {target} (paths.data_dir={data_dir})")
    return 0
