"""Outputs that appear complete or not at all: write into a staging folder, then rename into place.

``evaluate``, ``compare --out`` and ``study --out`` write several files that belong together (a report and
its plots; metrics, a gallery and exports). Written in place, a full or read-only disk, a crash or a
signal leaves a 0-byte ``report.md`` or a ``gallery.json`` without its ``metrics.json``. With
:func:`staged_outputs` they are written into ``<out>/.partial-XXXX/`` and moved into ``<out>`` by renames
(one file system: no space needed, nothing half-written) once all of them are complete, the names in
``last`` (the file whose presence means "complete", e.g. ``metrics.json``) after the others. If anything
fails, the staging folder is removed and the outputs already moved are removed again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_outputs(out_dir: str | Path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder inside ``out_dir``; on a normal exit move its entries into ``out_dir``
    (:func:`publish`); always remove it. OSErrors propagate (the caller names its key and the folder)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    try:
        yield staging
        publish(staging, out_dir, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out_dir: Path, last: tuple[str, ...] = ()) -> list[Path]:
    """Move every entry of ``staging`` into ``out_dir`` (an older entry of the same name is replaced),
    the names in ``last`` last; on failure remove the ones already moved and re-raise. Returns the
    moved paths."""
    names = sorted(p.name for p in staging.iterdir())
    order = [n for n in names if n not in last] + [n for n in last if n in names]
    moved: list[Path] = []
    try:
        for name in order:
            dest = out_dir / name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(staging / name, dest)
            moved.append(dest)
    except BaseException:
        for dest in moved:
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest, ignore_errors=True)
            else:
                dest.unlink(missing_ok=True)
        raise
    return moved


def describe_os_error(e: OSError) -> str:
    """``"No space left on device (errno 28, ENOSPC)"``."""
    name = errno.errorcode.get(e.errno or 0, "")
    code = f"errno {e.errno}, {name}" if name else type(e).__name__
    return f"{e.strerror or e} ({code})"


__all__ = ["describe_os_error", "publish", "staged_outputs"]
