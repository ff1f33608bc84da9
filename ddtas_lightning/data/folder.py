"""Any ``root/<class>/<image>`` tree (torchvision ImageFolder style) with a class-disjoint split."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ddtas_lightning.data.image_dataset import IMAGE_EXTENSIONS, WHITE, parse_background, read_lines
from ddtas_lightning.data.records import DatasetLayoutError, DatasetSource, SplitRecords, distinct_images

log = logging.getLogger(__name__)

LAYOUT = "<root>/<class_name>/<image>.{jpg,png,...} (sub-folders of a class folder are included)"
SPLIT_FILE_FORMATS = (
    "a YAML/JSON mapping {train: [class names], test: [class names]} (.yaml/.yml/.json), or a text file "
    "with one '<train|test> <class name>' per line"
)


def _joined_surrogates(name: str) -> str:
    """A class name with UTF-16 surrogate pairs (a YAML ``"\ud83d\udc26"``) joined into the character they
    encode (``🐦``), as the folder name on disk has it; other text unchanged."""
    try:
        return name.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:  # a lone surrogate: left as written (it then matches no folder)
        return name


class Folder(DatasetSource):
    """Images in ``root/<class>/...``, split class-disjointly.

    Class ids are the positions of the class folders in sorted order (0-based, over *all* folders, so
    train and test ids never collide and do not depend on the split). ``class_names[id]`` gives the
    folder name.

    Args:
        root: the folder of class folders.
        split: ``"sorted_half"`` (the first half of the sorted class names train, the rest test),
            ``"interleaved"`` (every other class in sorted order: positions 0, 2, 4, ... train, 1, 3, 5, ...
            test; for trees whose sorted names run through blocks, e.g. emoji or CJK codepoints, where a
            half would put one block in train and another in test), a float
            fraction in (0, 1) (the first ``round(fraction * C)`` classes train), or the path of a split
            file: a YAML/JSON mapping ``{train: [...], test: [...]}`` of class names, or a text file with
            one ``<train|test> <class name>`` per line. Classes named in neither side of a split file
            are left out (with a warning); relative paths are tried against the working directory, then
            ``root``.
        extensions: image file suffixes (case-insensitive); other files are ignored.
        background: the colour transparent pixels are composited onto when read (``white``, ``black``,
            ``grey``, ``"#rrggbb"``, a grey level, ``[r, g, b]``; ``null`` drops the alpha channel); read by
            the data module (:func:`~ddtas_lightning.data.image_dataset.parse_background`).

    Checked: root exists and has class folders, no class folder is empty, a split file parses, names
    only existing classes, no class on both sides, and leaves both sides non-empty.
    """

    expected_counts: dict[str, int] = {}  # no published counts for an arbitrary tree

    def __init__(self, root: str | Path, split: str | float = "sorted_half",
                 extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS, background=WHITE) -> None:
        self.root = Path(root).expanduser()
        self.background = parse_background(background, "dataset.source.background")
        self.split = split
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.class_names: dict[int, str] = {}
        self._table: tuple[list[Path], list[int]] | None = None
        self._train_ids: set[int] | None = None

    def _scan(self) -> tuple[list[Path], list[int]]:
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise DatasetLayoutError(f"image folder root {self.root} {what}; expected layout: {LAYOUT}")
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DatasetLayoutError(f"{self.root} has no class folders; expected layout: {LAYOUT}")
        paths: list[Path] = []
        ys: list[int] = []
        for cid, name in enumerate(classes):
            files = sorted(
                p for p in (self.root / name).rglob("*")
                if p.suffix.lower() in self.extensions and not p.name.startswith(".") and p.is_file()
            )
            if not files:
                raise DatasetLayoutError(f"class folder {self.root / name} has no image "
                                         f"({', '.join(self.extensions)}); expected layout: {LAYOUT}")
            paths += files
            ys += [cid] * len(files)
        self.class_names = dict(enumerate(classes))
        return paths, ys

    def _fraction(self) -> float | None:
        s = self.split
        if isinstance(s, bool):
            raise ValueError(f"split must be 'sorted_half', 'interleaved', a fraction or a split file, got {s!r}")
        if isinstance(s, int | float):
            return float(s)
        if s == "sorted_half":
            return 0.5
        try:
            return float(s)
        except ValueError:
            return None

    def _split_file(self) -> Path:
        p = Path(str(self.split)).expanduser()
        for cand in (p, self.root / p):
            if cand.is_file():
                return cand
        raise DatasetLayoutError(f"split file {p} does not exist (also tried {self.root / p}); expected "
                                 f"'sorted_half', 'interleaved', a fraction in (0, 1), or {SPLIT_FILE_FORMATS}")

    def _read_split_file(self, path: Path) -> dict[str, list[str]]:
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            import yaml

            try:
                text = path.read_text(encoding="utf-8")
                # JSON by its own parser: YAML reads "\ud83d\udc26" (an emoji written as its UTF-16 surrogate
                # pair, as json.dumps does by default) as two lone surrogates that match no folder name
                data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
            except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DatasetLayoutError(f"cannot parse split file {path}: {e}; expected "
                                         f"{SPLIT_FILE_FORMATS}") from None
            if not isinstance(data, dict) or set(data) - {"train", "test"} or not all(
                isinstance(v, list) for v in data.values()
            ):
                raise DatasetLayoutError(f"split file {path} is not a mapping of 'train'/'test' to lists of "
                                         f"class names; expected {SPLIT_FILE_FORMATS}")
            return {k: [_joined_surrogates(str(c)) for c in data.get(k) or []] for k in ("train", "test")}
        out: dict[str, list[str]] = {"train": [], "test": []}
        for n, line in enumerate(read_lines(path, SPLIT_FILE_FORMATS), start=1):
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or parts[0] not in out:
                raise DatasetLayoutError(f"split file {path} line {n} is {line!r}; expected "
                                         "'<train|test> <class name>'")
            out[parts[0]].append(parts[1])
        return out

    def _parse(self) -> tuple[list[Path], list[int]]:
        if self._table is not None:
            return self._table
        paths, ys = self._scan()
        paths = distinct_images(paths, ys, self.root)  # a symlinked folder must not relabel images
        ids = {name: cid for cid, name in self.class_names.items()}
        frac = None if self.split == "interleaved" else self._fraction()
        if self.split == "interleaved":
            if len(ids) < 2:
                raise DatasetLayoutError(f"split='interleaved' needs at least 2 class folders in {self.root}, "
                                         f"found {len(ids)}")
            train = {cid for cid in ids.values() if cid % 2 == 0}
        elif frac is not None:
            n_train = round(frac * len(ids))
            if not 0 < n_train < len(ids):
                raise DatasetLayoutError(f"split={self.split!r} puts {n_train} of the {len(ids)} classes in "
                                         f"{self.root} into train; expected at least one class per side")
            train = set(range(n_train))
        else:
            path = self._split_file()
            named = self._read_split_file(path)
            for side, names in named.items():
                unknown = [c for c in names if c not in ids]
                if unknown:
                    raise DatasetLayoutError(f"split file {path} names {side} classes {unknown[:5]} that are "
                                             f"not class folders of {self.root}")
                if not names:
                    raise DatasetLayoutError(f"split file {path} lists no {side} class; expected both sides")
            both = sorted(set(named["train"]) & set(named["test"]))
            if both:
                raise DatasetLayoutError(f"split file {path} puts classes {both[:5]} in both train and test; "
                                         "expected a class-disjoint split")
            left_out = len(ids) - len(set(named["train"]) | set(named["test"]))
            if left_out:
                log.warning("split file %s names neither side for %d class folders of %s: left out",
                            path, left_out, self.root)
            train = {ids[c] for c in named["train"]}
            test = {ids[c] for c in named["test"]}
            keep = [i for i, y in enumerate(ys) if y in train or y in test]
            paths, ys = [paths[i] for i in keep], [ys[i] for i in keep]
        self._train_ids = train
        self._table = (paths, ys)
        return self._table

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        paths, ys = self._parse()
        assert self._train_ids is not None
        keep = [i for i, y in enumerate(ys) if (y in self._train_ids) == (split == "train")]
        return SplitRecords([paths[i] for i in keep], [ys[i] for i in keep])
