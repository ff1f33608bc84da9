"""CUB-200-2011 (Wah et al. 2011) with the deep-metric-learning class-disjoint split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

from ddtas_lightning.data.image_dataset import (
    check_images_exist,
    read_lines,
    require_dir,
    split_classes,
    warn_if_counts_differ,
)
from ddtas_lightning.data.records import (
    DatasetLayoutError,
    DatasetSource,
    SplitRecords,
    distinct_images,
    listed_path,
)

log = logging.getLogger(__name__)

LAYOUT = (
    "CUB_200_2011/{images.txt ('<image_id> <class_dir>/<file>'), image_class_labels.txt "
    "('<image_id> <class_id>'), classes.txt ('<class_id> <class_name>'), images/<class_dir>/<file>}"
)


def _parse_pairs(path: Path, value_is_int: bool, paths_under: Path | None = None) -> dict[int, str | int]:
    """``<int id> <value>`` per line -> {id: value}; one error per malformed line or duplicate id.
    ``paths_under``: the values are image paths, each must stay inside that folder (:func:`listed_path`)."""
    out: dict[int, str | int] = {}
    for n, line in enumerate(read_lines(path, LAYOUT), start=1):
        parts = line.split(maxsplit=1)
        try:
            key = int(parts[0])
            value: str | int = int(parts[1]) if value_is_int else parts[1]
        except (ValueError, IndexError):
            kind = "<id> <integer>" if value_is_int else "<id> <name>"
            raise DatasetLayoutError(f"{path} line {n} is {line!r}; expected '{kind}' ({LAYOUT})") from None
        if key in out:
            raise DatasetLayoutError(f"{path} line {n}: id {key} is listed twice; expected unique ids")
        if paths_under is not None:
            listed_path(paths_under, str(value), path, f"line {n}")
        out[key] = value
    if not out:
        raise DatasetLayoutError(f"{path} is empty; expected layout: {LAYOUT}")
    return out


class CUB200(DatasetSource):
    """CUB-200-2011 for deep metric learning: classes 1-100 train (5,864 images), 101-200 test (5,924).

    ``root`` is the ``CUB_200_2011/`` folder or its parent. Only ``images.txt``,
    ``image_class_labels.txt``, ``classes.txt`` and ``images/`` are read; ``train_test_split.txt`` is the
    *classification* split and is never used. Labels are the raw 1-based class ids.

    Args:
        root: ``CUB_200_2011/`` or the folder holding it.
        train_classes: ``None`` = the first half of the sorted class ids (1-100 of 200); an int N = the
            first N class ids; a list = exactly those class ids. The remaining classes are the test split.
        check_images: stat every listed image at load time (one clear error for missing files); set
            False to skip it on slow file systems.

    Checked: the three files exist and parse, ids are unique and agree between ``images.txt`` and
    ``image_class_labels.txt``, every class id is in ``classes.txt``, every class has an image, and
    (``check_images``) every listed image exists. When the tree has the full 200 classes but its counts
    differ from ``expected_counts``, a warning is logged.
    """

    expected_counts: ClassVar[dict[str, int]] = {
        "train_images": 5864, "train_classes": 100, "test_images": 5924, "test_classes": 100,
    }
    full_num_classes = 200

    def __init__(self, root: str | Path, train_classes: int | list[int] | None = None,
                 check_images: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.train_classes = train_classes
        self.check_images = check_images
        self._table: tuple[list[Path], list[int]] | None = None
        self._train_ids: set[int] | None = None
        self.class_names: dict[int, str] = {}

    def dataset_dir(self) -> Path:
        """The ``CUB_200_2011/`` folder: ``root`` itself or ``root/CUB_200_2011``."""
        for d in (self.root, self.root / "CUB_200_2011"):
            if (d / "images.txt").is_file():
                return d
        if not self.root.exists():
            raise DatasetLayoutError(f"CUB-200-2011 root {self.root} does not exist; expected layout: {LAYOUT}")
        raise DatasetLayoutError(
            f"no images.txt in {self.root} or {self.root / 'CUB_200_2011'}; expected layout: {LAYOUT}"
        )

    def _parse(self) -> tuple[list[Path], list[int]]:
        if self._table is not None:
            return self._table
        d = self.dataset_dir()
        images_file, labels_file, classes_file = d / "images.txt", d / "image_class_labels.txt", d / "classes.txt"
        image_dir = require_dir(d / "images", LAYOUT)
        names = _parse_pairs(images_file, value_is_int=False, paths_under=image_dir)
        labels = _parse_pairs(labels_file, value_is_int=True)
        classes = _parse_pairs(classes_file, value_is_int=False)
        if names.keys() != labels.keys():
            only_img = sorted(names.keys() - labels.keys())
            only_lab = sorted(labels.keys() - names.keys())
            raise DatasetLayoutError(
                f"image ids disagree between {images_file} and {labels_file}: "
                f"{len(only_img)} ids only in images.txt (e.g. {only_img[:5]}), "
                f"{len(only_lab)} only in image_class_labels.txt (e.g. {only_lab[:5]}); "
                "expected the same image ids in both files"
            )
        unknown = sorted({c for c in labels.values() if c not in classes})
        if unknown:
            raise DatasetLayoutError(
                f"{labels_file} uses class ids {unknown[:5]} that are not in {classes_file}; "
                "expected every class id to be listed in classes.txt"
            )
        used = set(labels.values())
        empty = sorted(c for c in classes if c not in used)
        if empty:
            raise DatasetLayoutError(
                f"classes {[f'{c} {classes[c]}' for c in empty[:5]]} listed in {classes_file} have no images "
                f"in {labels_file}; expected at least one image per class"
            )
        ids = sorted(names)
        paths = [image_dir / str(names[i]) for i in ids]
        ys = [int(labels[i]) for i in ids]
        if self.check_images:
            check_images_exist(paths, images_file, LAYOUT)
            paths = distinct_images(paths, ys, images_file)
        self.class_names = {int(c): str(n) for c, n in classes.items()}
        self._table = (paths, ys)
        self._train_ids = split_classes(classes, self.train_classes, str(classes_file))
        self._warn_counts(ys)
        return self._table

    def _warn_counts(self, ys: list[int]) -> None:
        assert self._train_ids is not None
        train = [y for y in ys if y in self._train_ids]
        actual = {
            "train_images": len(train), "train_classes": len(set(train)),
            "test_images": len(ys) - len(train), "test_classes": len(set(ys)) - len(set(train)),
        }
        warn_if_counts_differ("CUB-200-2011", self.expected_counts, actual,
                              full_size=len(set(ys)) == self.full_num_classes)

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        paths, ys = self._parse()
        assert self._train_ids is not None
        want_train = split == "train"
        keep = [i for i, y in enumerate(ys) if (y in self._train_ids) == want_train]
        return SplitRecords([paths[i] for i in keep], [ys[i] for i in keep])
