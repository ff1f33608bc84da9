"""Stanford Online Products (Song et al., CVPR 2016), split as given by its Ebay_train/Ebay_test files."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ddtas_lightning.data.image_dataset import check_images_exist, read_lines, warn_if_counts_differ
from ddtas_lightning.data.records import (
    DatasetLayoutError,
    DatasetSource,
    SplitRecords,
    check_disjoint_splits,
    distinct_images,
    listed_path,
)

HEADER = ["image_id", "class_id", "super_class_id", "path"]
LAYOUT = (
    "Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt (header 'image_id class_id super_class_id path', "
    "then one image per line, path relative to Stanford_Online_Products/), bicycle_final/..., ...}"
)


class SOP(DatasetSource):
    """Stanford Online Products: 59,551 train images of 11,318 products, 60,502 test images of 11,316.

    The split is the one in ``Ebay_train.txt`` / ``Ebay_test.txt`` (class ids 1-11,318 train,
    11,319-22,634 test). Labels are the raw ``class_id``s (product ids); ``super_labels[split]`` keeps the
    ``super_class_id`` (1-12) of every image, in the same order, for hierarchical samplers.

    Args:
        root: ``Stanford_Online_Products/`` or the folder holding it.
        check_images: stat every listed image at load time (120k stats; set False on slow file systems).

    Checked: both files exist, their header and every line parse, image ids and paths are unique per
    file, train and test classes are disjoint, images exist. A full-size tree (over 100,000 images)
    whose counts differ from ``expected_counts`` logs a warning.
    """

    expected_counts: ClassVar[dict[str, int]] = {
        "train_images": 59551, "train_classes": 11318, "test_images": 60502, "test_classes": 11316,
    }
    files = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}

    def __init__(self, root: str | Path, check_images: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.check_images = check_images
        self.super_labels: dict[str, list[int]] = {}
        self._tables: dict[str, tuple[list[Path], list[int]]] | None = None

    def dataset_dir(self) -> Path:
        for d in (self.root, self.root / "Stanford_Online_Products"):
            if (d / "Ebay_train.txt").is_file():
                return d
        if not self.root.exists():
            raise DatasetLayoutError(f"SOP root {self.root} does not exist; expected layout: {LAYOUT}")
        raise DatasetLayoutError(f"no Ebay_train.txt in {self.root} or {self.root / 'Stanford_Online_Products'}; "
                                 f"expected layout: {LAYOUT}")

    def _read(self, path: Path, d: Path) -> tuple[list[Path], list[int], list[int]]:
        lines = read_lines(path, LAYOUT)
        if not lines or lines[0].split() != HEADER:
            first = lines[0] if lines else "(empty file)"
            raise DatasetLayoutError(f"{path} starts with {first!r}; expected the header "
                                     f"'{' '.join(HEADER)}' ({LAYOUT})")
        paths, ys, supers, ids, seen = [], [], [], set(), set()
        for n, line in enumerate(lines[1:], start=2):
            parts = line.split(maxsplit=3)
            try:
                image_id, cls, sup, rel = int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
            except (ValueError, IndexError):
                raise DatasetLayoutError(f"{path} line {n} is {line!r}; expected "
                                         f"'<image_id> <class_id> <super_class_id> <path>'") from None
            if image_id in ids or rel in seen:
                raise DatasetLayoutError(f"{path} line {n}: image id {image_id} / path {rel} is listed twice; "
                                         "expected each image once")
            ids.add(image_id)
            seen.add(rel)
            paths.append(listed_path(d, rel, path, f"line {n}"))
            ys.append(cls)
            supers.append(sup)
        if not paths:
            raise DatasetLayoutError(f"{path} lists no image; expected layout: {LAYOUT}")
        if self.check_images:
            check_images_exist(paths, path, LAYOUT)
            paths = distinct_images(paths, ys, path)
        return paths, ys, supers

    def _parse(self) -> dict[str, tuple[list[Path], list[int]]]:
        if self._tables is not None:
            return self._tables
        d = self.dataset_dir()
        tables = {}
        for split, name in self.files.items():
            paths, ys, supers = self._read(d / name, d)
            tables[split] = (paths, ys)
            self.super_labels[split] = supers
        shared = set(tables["train"][1]) & set(tables["test"][1])
        if shared:
            raise DatasetLayoutError(
                f"class ids {sorted(shared)[:5]} appear in both {d / self.files['train']} and "
                f"{d / self.files['test']}; expected class-disjoint train and test splits"
            )
        # a test line may reuse a train image under a test class id: the same file in both splits
        check_disjoint_splits({s: t[0] for s, t in tables.items()}, {s: d / n for s, n in self.files.items()})
        n_train, n_test = len(tables["train"][1]), len(tables["test"][1])
        warn_if_counts_differ(
            "Stanford Online Products", self.expected_counts,
            {"train_images": n_train, "train_classes": len(set(tables["train"][1])),
             "test_images": n_test, "test_classes": len(set(tables["test"][1]))},
            full_size=n_train + n_test > 100_000,
        )
        self._tables = tables
        return tables

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        paths, ys = self._parse()[split]
        return SplitRecords(list(paths), list(ys))
