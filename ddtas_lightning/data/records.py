"""What every dataset loader produces: a list of image files with class labels for one split.

Loaders (CUB-200-2011, Cars196, SOP, In-Shop, image folders, the embedded synthetic set) only parse
their own file layout into :class:`SplitRecords`; :class:`ImageDataset` turns records into tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ddtas_lightning.config.validation import check_choice

if TYPE_CHECKING:
    import torch  # imported where used: `python -m ddtas_lightning.data.prepare` needs no torch


class DatasetLayoutError(RuntimeError):
    """A dataset on disk does not match the layout its loader expects. The message names the file."""


@dataclass
class SplitRecords:
    """One split: ``paths[i]`` has raw class id ``labels[i]``.

    is_query / is_gallery: retrieval roles (In-Shop has separate query and gallery images); ``None``
    means every image is both a query and a gallery item (query == gallery, self excluded).
    """

    paths: list[Path]
    labels: list[int]
    is_query: list[bool] | None = None
    is_gallery: list[bool] | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if len(self.labels) != n:
            raise ValueError(f"{n} paths but {len(self.labels)} labels")
        for name in ("is_query", "is_gallery"):
            flags = getattr(self, name)
            if flags is not None and len(flags) != n:
                raise ValueError(f"{n} paths but {len(flags)} {name} flags")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(set(self.labels))

    def query_gallery(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        n = len(self)
        q = torch.ones(n, dtype=torch.bool) if self.is_query is None else torch.tensor(self.is_query)
        g = torch.ones(n, dtype=torch.bool) if self.is_gallery is None else torch.tensor(self.is_gallery)
        return q, g


class DatasetSource:
    """Base of dataset loaders. ``load(split)`` with split in {"train", "test"} returns SplitRecords."""

    splits = ("train", "test")

    def load(self, split: str) -> SplitRecords:
        raise NotImplementedError

    def check_split(self, split: str) -> None:
        check_choice("split", split, self.splits)


def listed_path(root: Path, rel: str, listed_in: str | Path, where: str) -> Path:
    """``root / rel`` for a path read from a dataset's index file (``images.txt``, ``Ebay_*.txt``, ...),
    refused when it leaves ``root``: an absolute path, or ``..`` climbing out of it
    (``../../home/user/.ssh/id_rsa``). An index file comes with a download and is as untrusted as the
    archive; without this check a training run or ``evaluate``'s gallery (which embeds the images it
    shows) would read any file the user can. The check is on the path as written (normalised, not
    resolved): symlinks the tree's owner made inside it are followed (``prepare`` refuses links in
    archives). Raises DatasetLayoutError naming the file, the line (``where``) and the path."""
    text = str(rel)
    root_norm = os.path.normpath(os.fspath(root))
    joined = os.path.normpath(os.path.join(root_norm, text))
    if "\0" in text or os.path.isabs(text) or not (joined == root_norm or joined.startswith(root_norm.rstrip(os.sep) + os.sep)):
        raise DatasetLayoutError(
            f"{listed_in} {where}: path {text!r} points outside the dataset root {root}; expected a path relative "
            "to it (not absolute, no '..' leaving it): an index file must not make the loader read other files"
        )
    return Path(root) / text


def distinct_images(paths: Sequence[Path], labels: Sequence[int], listed_in: str | Path) -> list[Path]:
    """``paths`` resolved (absolute, symlinks followed), checked to name each file for one class only.

    A symlink inside a dataset tree (``ln -s <root> <root>/c_link``) or a duplicated line otherwise puts
    one file under two labels, and, when the labels fall on both sides of a class-disjoint split, train
    images into the test split. Raises DatasetLayoutError naming the file and both entries."""
    resolved = [Path(os.path.realpath(p)) for p in paths]
    first: dict[Path, int] = {}
    for i, (real, y) in enumerate(zip(resolved, labels, strict=True)):
        j = first.setdefault(real, i)
        if j != i and labels[j] != y:
            raise DatasetLayoutError(
                f"{listed_in}: image {real} is listed for two classes, as {paths[j]} (class {labels[j]}) and as "
                f"{paths[i]} (class {y}); expected each image file in one class (a symlinked folder or a "
                "duplicated entry?)"
            )
    return resolved


def check_disjoint_splits(splits: dict[str, Sequence[Path]], listed_in: dict[str, str | Path]) -> None:
    """No resolved image file may appear in two splits (train images leaking into the test split)."""
    seen: dict[Path, str] = {}
    for split, paths in splits.items():
        for p in paths:
            real = Path(os.path.realpath(p))
            other = seen.setdefault(real, split)
            if other != split:
                raise DatasetLayoutError(
                    f"image {real} is listed in both the {other} split ({listed_in[other]}) and the {split} "
                    f"split ({listed_in[split]}); expected disjoint splits (a test image seen in training "
                    "inflates every test metric)"
                )
