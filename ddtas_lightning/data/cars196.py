"""Cars196 (Stanford Cars, Krause et al. 2013) with the deep-metric-learning class-disjoint split."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from ddtas_lightning.data.image_dataset import (
    check_images_exist,
    require_dir,
    require_file,
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

LAYOUT = (
    "<root>/{cars_annos.mat (struct array 'annotations' with fields relative_im_path, bbox_x1, bbox_y1, "
    "bbox_x2, bbox_y2, class, test; cell array 'class_names'), car_ims/000001.jpg ...}"
)
REQUIRED_FIELDS = ("relative_im_path", "class")


def _scalar(x) -> int:
    return int(np.asarray(x).reshape(-1)[0])


class Cars196(DatasetSource):
    """Cars196 for deep metric learning: classes 1-98 train (8,054 images), 99-196 test (8,131).

    Reads ``cars_annos.mat`` (the full 16,185-image annotation file of the ``car_ims.tgz`` release, not
    the devkit's ``cars_train_annos.mat``) with ``scipy.io.loadmat``; the ``test`` field is the
    *classification* split and is ignored. Labels are the raw 1-based class ids; image paths are
    ``root / relative_im_path``.

    Args:
        root: folder holding ``cars_annos.mat`` and ``car_ims/``.
        train_classes: ``None`` = first half of the sorted class ids (1-98 of 196); an int N = the first
            N; a list = exactly those ids.
        check_images: stat every listed image at load time.

    Checked: the .mat file loads and has the fields, class ids are within ``class_names`` (when present),
    no class of ``class_names`` is empty, paths are unique, images exist. A full-size tree (196 classes)
    whose counts differ from ``expected_counts`` logs a warning.
    """

    expected_counts: ClassVar[dict[str, int]] = {
        "train_images": 8054, "train_classes": 98, "test_images": 8131, "test_classes": 98,
    }
    full_num_classes = 196

    def __init__(self, root: str | Path, train_classes: int | list[int] | None = None,
                 check_images: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.train_classes = train_classes
        self.check_images = check_images
        self.class_names: dict[int, str] = {}
        self._table: tuple[list[Path], list[int]] | None = None
        self._train_ids: set[int] | None = None

    def _parse(self) -> tuple[list[Path], list[int]]:
        if self._table is not None:
            return self._table
        if not self.root.exists():
            raise DatasetLayoutError(f"Cars196 root {self.root} does not exist; expected layout: {LAYOUT}")
        mat_path = require_file(self.root / "cars_annos.mat", LAYOUT)
        require_dir(self.root / "car_ims", LAYOUT)
        from scipy.io import loadmat

        try:
            mat = loadmat(str(mat_path), squeeze_me=True)
        except Exception as e:  # scipy raises several types for bad files
            raise DatasetLayoutError(f"cannot read {mat_path}: {type(e).__name__}: {e}; expected a MATLAB "
                                     f"file ({LAYOUT})") from None
        annos = mat.get("annotations")
        if annos is None or annos.dtype.names is None:
            raise DatasetLayoutError(f"{mat_path} has no struct array 'annotations'; expected layout: {LAYOUT}")
        missing = [f for f in REQUIRED_FIELDS if f not in annos.dtype.names]
        if missing:
            raise DatasetLayoutError(f"{mat_path}: 'annotations' lacks fields {missing} (has "
                                     f"{list(annos.dtype.names)}); expected layout: {LAYOUT}")
        annos = np.atleast_1d(annos)
        if annos.size == 0:
            raise DatasetLayoutError(f"{mat_path}: 'annotations' is empty; expected layout: {LAYOUT}")
        rel = [str(p) for p in annos["relative_im_path"]]
        try:
            ys = [_scalar(c) for c in annos["class"]]
        except (ValueError, TypeError, IndexError):
            raise DatasetLayoutError(f"{mat_path}: 'annotations.class' is not an integer per image; "
                                     f"expected layout: {LAYOUT}") from None
        if "class_names" in mat:
            names = [str(n) for n in np.atleast_1d(mat["class_names"])]
            self.class_names = {i + 1: n for i, n in enumerate(names)}
            bad = sorted({y for y in ys if y not in self.class_names})
            if bad:
                raise DatasetLayoutError(f"{mat_path}: annotations use class ids {bad[:5]} outside 1.."
                                         f"{len(names)} (the length of 'class_names')")
            empty = sorted(set(self.class_names) - set(ys))
            if empty:
                raise DatasetLayoutError(f"{mat_path}: classes {empty[:5]} of 'class_names' have no image; "
                                         "expected at least one image per class")
            class_ids = list(self.class_names)
        else:
            class_ids = sorted(set(ys))
        seen: set[str] = set()
        for p in rel:
            if p in seen:
                raise DatasetLayoutError(f"{mat_path}: image {p} is annotated more than once; expected "
                                         "one annotation per image")
            seen.add(p)
        paths = [listed_path(self.root, p, mat_path, f"annotation {i + 1} (relative_im_path)") for i, p in enumerate(rel)]
        if self.check_images:
            check_images_exist(paths, mat_path, LAYOUT)
            paths = distinct_images(paths, ys, mat_path)
        self._train_ids = split_classes(class_ids, self.train_classes, str(mat_path))
        self._table = (paths, ys)
        train = [y for y in ys if y in self._train_ids]
        warn_if_counts_differ(
            "Cars196", self.expected_counts,
            {"train_images": len(train), "train_classes": len(set(train)), "test_images": len(ys) - len(train),
             "test_classes": len(set(ys)) - len(set(train))},
            full_size=len(set(ys)) == self.full_num_classes,
        )
        return self._table

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        paths, ys = self._parse()
        assert self._train_ids is not None
        keep = [i for i, y in enumerate(ys) if (y in self._train_ids) == (split == "train")]
        return SplitRecords([paths[i] for i in keep], [ys[i] for i in keep])
