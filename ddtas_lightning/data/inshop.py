"""DeepFashion In-Shop Clothes Retrieval (Liu et al., CVPR 2016): train items, and query/gallery test items."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

from ddtas_lightning.data.image_dataset import check_images_exist, read_lines, warn_if_counts_differ
from ddtas_lightning.data.records import (
    DatasetLayoutError,
    DatasetSource,
    SplitRecords,
    distinct_images,
    listed_path,
)

log = logging.getLogger(__name__)

STATUSES = ("train", "query", "gallery")
HEADER = ["image_name", "item_id", "evaluation_status"]
LAYOUT = (
    "<root>/{list_eval_partition.txt or Eval/list_eval_partition.txt (line 1: number of images; line 2: "
    "'image_name item_id evaluation_status'; then 'img/<...>/<file>.jpg id_<number> train|query|gallery'), "
    "img/... (or Img/img/...)}"
)


def _item_label(item: str) -> int:
    """``id_00000002`` -> 2 (the raw item id)."""
    return int(item.removeprefix("id_"))


class InShop(DatasetSource):
    """In-Shop Clothes Retrieval: 25,882 train images (3,997 items); test = 14,218 query + 12,612 gallery
    images (3,985 items).

    ``load("test")`` returns the query and gallery images together, with ``is_query`` / ``is_gallery``
    flags (each image is exactly one of the two): queries are searched in the gallery only. Labels are
    the numeric part of ``item_id``.

    Args:
        root: the In-Shop folder; ``list_eval_partition.txt`` is looked for in ``root`` and ``root/Eval``,
            image paths (``img/...``) are resolved against ``root`` or, if ``root/img`` is absent,
            ``root/Img``.
        check_images: stat every listed image at load time.

    Checked: the count line matches the number of entries, the header, every line's fields and status,
    unique image names, train items disjoint from test items, images exist. Query items with no gallery
    image are logged as a warning (they cannot be retrieved). A full-size file (52,712 images) whose
    counts differ from ``expected_counts`` logs a warning.
    """

    expected_counts: ClassVar[dict[str, int]] = {
        "train_images": 25882, "train_classes": 3997, "query_images": 14218, "gallery_images": 12612,
        "test_classes": 3985,
    }
    full_num_images = 52712

    def __init__(self, root: str | Path, check_images: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.check_images = check_images
        self._rows: list[tuple[Path, int, str]] | None = None

    def partition_file(self) -> Path:
        for p in (self.root / "list_eval_partition.txt", self.root / "Eval" / "list_eval_partition.txt"):
            if p.is_file():
                return p
        if not self.root.exists():
            raise DatasetLayoutError(f"In-Shop root {self.root} does not exist; expected layout: {LAYOUT}")
        raise DatasetLayoutError(f"no list_eval_partition.txt in {self.root} or {self.root / 'Eval'}; "
                                 f"expected layout: {LAYOUT}")

    def _image_base(self, first: str) -> Path:
        top = first.split("/", 1)[0]
        for base in (self.root, self.root / "Img"):
            if (base / top).is_dir():
                return base
        return self.root

    def _parse(self) -> list[tuple[Path, int, str]]:
        if self._rows is not None:
            return self._rows
        path = self.partition_file()
        lines = read_lines(path, LAYOUT)
        if len(lines) < 2 or not lines[0].isdigit() or lines[1].split() != HEADER:
            raise DatasetLayoutError(f"{path} does not start with a count line and the header "
                                     f"'{' '.join(HEADER)}'; expected layout: {LAYOUT}")
        entries = lines[2:]
        if int(lines[0]) != len(entries):
            raise DatasetLayoutError(f"{path} announces {lines[0]} images but lists {len(entries)}; "
                                     "expected the count on line 1 to match (truncated file?)")
        if not entries:
            raise DatasetLayoutError(f"{path} lists no image; expected layout: {LAYOUT}")
        base = self._image_base(entries[0].split()[0])
        rows, seen = [], set()
        for n, line in enumerate(entries, start=3):
            parts = line.split()
            if len(parts) != 3 or parts[2] not in STATUSES or not parts[1].startswith("id_"):
                raise DatasetLayoutError(f"{path} line {n} is {line!r}; expected '<image_name> id_<number> "
                                         f"train|query|gallery'")
            try:
                label = _item_label(parts[1])
            except ValueError:
                raise DatasetLayoutError(f"{path} line {n}: item id {parts[1]!r} is not id_<number>") from None
            if parts[0] in seen:
                raise DatasetLayoutError(f"{path} line {n}: image {parts[0]} is listed twice")
            seen.add(parts[0])
            rows.append((listed_path(base, parts[0], path, f"line {n}"), label, parts[2]))
        train_items = {y for _, y, s in rows if s == "train"}
        test_items = {y for _, y, s in rows if s != "train"}
        shared = train_items & test_items
        if shared:
            raise DatasetLayoutError(f"{path}: items {sorted(shared)[:5]} have both train and query/gallery "
                                     "images; expected item-disjoint train and test splits")
        if not train_items or not test_items:
            raise DatasetLayoutError(f"{path}: no train or no query/gallery image; expected both")
        gallery_items = {y for _, y, s in rows if s == "gallery"}
        lonely = sorted({y for _, y, s in rows if s == "query"} - gallery_items)
        if lonely:
            log.warning("In-Shop: %d query items have no gallery image (e.g. id %d): their queries cannot "
                        "be answered", len(lonely), lonely[0])
        if self.check_images:
            check_images_exist([p for p, _, _ in rows], path, LAYOUT)
            real = distinct_images([p for p, _, _ in rows], [y for _, y, _ in rows], path)
            rows = [(r, y, s) for r, (_, y, s) in zip(real, rows, strict=True)]
        count = {s: sum(1 for _, _, t in rows if t == s) for s in STATUSES}
        warn_if_counts_differ(
            "In-Shop", self.expected_counts,
            {"train_images": count["train"], "train_classes": len(train_items), "query_images": count["query"],
             "gallery_images": count["gallery"], "test_classes": len(test_items)},
            full_size=len(rows) == self.full_num_images,
        )
        self._rows = rows
        return rows

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        rows = self._parse()
        if split == "train":
            picked = [r for r in rows if r[2] == "train"]
            return SplitRecords([p for p, _, _ in picked], [y for _, y, _ in picked])
        picked = [r for r in rows if r[2] != "train"]
        return SplitRecords(
            [p for p, _, _ in picked], [y for _, y, _ in picked],
            is_query=[s == "query" for _, _, s in picked], is_gallery=[s == "gallery" for _, _, s in picked],
        )
