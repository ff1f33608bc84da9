"""NSPA's synthetic data: isotropic Gaussian clusters in R^32, generated in memory from a seed (no files).

Kertész, "Deep Metric Learning Using Negative Sampling Probability Annealing", Sensors 2022 (spec
docs/papers/nspa.md §2.1; the author's ``notebooks/dataset-generation.ipynb``): ``k = 7`` classes of
``n = 1100`` points in ``d = 32`` dimensions, class centres ``c_i ~ U[0, 1]^d`` and points
``x = c_i - sigma * eps`` with ``eps ~ N(0, I_d)``, ``sigma = 0.2``. Splits: train = classes 0-4 x samples
0-999, val = classes 0-4 x samples 1000-1099 (the author's validation set), test = classes 5-6 x all
samples (unseen classes).

The data module uses ``train`` and ``test`` (validation runs on the test split, as for the image sets).
``test_split="heldout"`` makes the author's val split play the test role instead: the paper's cluster
analysis (spec §3.2) was done on those held-out samples of the *train* classes, not on unseen classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddtas_lightning.config.validation import check_choice
from ddtas_lightning.data.records import DatasetSource, SplitRecords
from ddtas_lightning.data.transforms import TransformPair


def gaussian_clusters(
    num_classes: int = 7, points_per_class: int = 1100, dim: int = 32, sigma: float = 0.2, seed: int = 0
) -> np.ndarray:
    """The (num_classes, points_per_class, dim) float32 array of the author's generator, seeded.

    Centres first (one ``(k, d)`` uniform draw), then each class's noise in class order, all from
    ``numpy.random.default_rng(seed)`` (the author used the unseeded global numpy generator).
    """
    rng = np.random.default_rng(seed)
    centres = rng.random((num_classes, dim))
    points = np.stack(
        [centres[c] - sigma * rng.standard_normal((points_per_class, dim)) for c in range(num_classes)]
    )
    return points.astype(np.float32)


class RowDataset(Dataset):
    """``dataset[i] -> (row i, through ``transform`` if given, label, i)`` over ``num_rows`` rows with one
    label each; subclasses say how row ``i`` is read (:meth:`_row`) and what a row is called (``noun``, for
    the length-mismatch error). Attributes as ImageDataset: ``labels`` (LongTensor), ``paths``, ``is_query``
    / ``is_gallery`` (all True: every row is a query and a gallery item)."""

    noun = "rows"

    def __init__(self, num_rows: int, labels, paths, transform=None) -> None:
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if num_rows != len(self.labels):
            raise ValueError(f"{num_rows} {self.noun} but {len(self.labels)} labels")
        self.paths = list(paths)
        self.is_query = torch.ones(len(self.labels), dtype=torch.bool)
        self.is_gallery = torch.ones(len(self.labels), dtype=torch.bool)
        self.transform = transform

    def _row(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        x = self._row(i)
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i]), i


class VectorDataset(RowDataset):
    """``dataset[i] -> (vector, label, i)``, the vector counterpart of :class:`ImageDataset`.

    Attributes as ImageDataset: ``labels`` (LongTensor), ``paths`` (point identifiers), ``is_query`` /
    ``is_gallery`` (all True: every point is a query and a gallery item).
    """

    noun = "vectors"

    def __init__(
        self,
        vectors: torch.Tensor,
        labels,
        paths=None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.vectors = torch.as_tensor(vectors, dtype=torch.float32)
        labels = list(labels)
        if paths is None:
            paths = [Path(str(i)) for i in range(len(labels))]
        super().__init__(len(self.vectors), labels, paths, transform)

    def _row(self, i: int) -> torch.Tensor:
        return self.vectors[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} vectors of dim {self.vectors.shape[1]})"


class GaussianClusters(DatasetSource):
    """NSPA's synthetic Gaussian clusters as a dataset source (module docstring for the recipe).

    Args:
        num_classes, points_per_class, dim, sigma: the generator's k, n, d and noise scale.
        train_classes: the first ``train_classes`` classes train, the rest test (unseen classes).
        train_points_per_class: train samples per train class (the author: 1000 of 1100); the rest of each
            train class is the ``val`` split.
        seed: the data seed (the same set for every training seed, as the author's single pickled set).
        test_split: ``"unseen"`` (the test classes; the DML protocol) or ``"heldout"`` (the val split, the
            paper's cluster-analysis set) is returned for ``load("test")``.

    Records carry identifiers ``gaussian_clusters/<class>/<sample>`` instead of file paths;
    :meth:`make_dataset` turns records back into vectors (the data module calls it instead of building an
    ImageDataset).
    """

    splits = ("train", "val", "test")

    def __init__(
        self,
        num_classes: int = 7,
        points_per_class: int = 1100,
        dim: int = 32,
        sigma: float = 0.2,
        train_classes: int = 5,
        train_points_per_class: int = 1000,
        seed: int = 0,
        test_split: str = "unseen",
    ) -> None:
        check_choice("test_split", test_split, ("unseen", "heldout"))
        if not 0 < train_classes < num_classes:
            raise ValueError(
                f"train_classes={train_classes} must be between 1 and num_classes - 1 = {num_classes - 1}"
            )
        if not 2 <= train_points_per_class <= points_per_class:
            raise ValueError(
                f"train_points_per_class={train_points_per_class} must be between 2 and "
                f"points_per_class={points_per_class}"
            )
        if dim < 1 or sigma < 0:
            raise ValueError(f"dim must be >= 1 and sigma >= 0, got dim={dim}, sigma={sigma}")
        self.num_classes, self.points_per_class, self.dim = int(num_classes), int(points_per_class), int(dim)
        self.sigma, self.seed = float(sigma), int(seed)
        self.train_classes, self.train_points_per_class = int(train_classes), int(train_points_per_class)
        self.test_split = test_split
        self._points: torch.Tensor | None = None

    @property
    def points(self) -> torch.Tensor:
        """All generated points, (num_classes, points_per_class, dim), generated on first use."""
        if self._points is None:
            self._points = torch.from_numpy(
                gaussian_clusters(self.num_classes, self.points_per_class, self.dim, self.sigma, self.seed)
            )
        return self._points

    @staticmethod
    def point_id(c: int, j: int) -> Path:
        return Path("gaussian_clusters", str(c), str(j))

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        n, n_train = self.points_per_class, self.train_points_per_class
        if split == "test" and self.test_split == "heldout":
            split = "val"
        if split == "train":
            cells = [(c, j) for c in range(self.train_classes) for j in range(n_train)]
        elif split == "val":
            if n_train == n:
                raise ValueError("the val split is empty: train_points_per_class = points_per_class")
            cells = [(c, j) for c in range(self.train_classes) for j in range(n_train, n)]
        else:
            cells = [(c, j) for c in range(self.train_classes, self.num_classes) for j in range(n)]
        return SplitRecords([self.point_id(c, j) for c, j in cells], [c for c, _ in cells])

    def make_dataset(self, records: SplitRecords, transform=None) -> VectorDataset:
        """The vectors of ``records`` (any subset of this source's records, e.g. a class-disjoint split)."""
        cells = [(int(p.parent.name), int(p.name)) for p in map(Path, records.paths)]
        c = torch.tensor([a for a, _ in cells], dtype=torch.long)
        j = torch.tensor([b for _, b in cells], dtype=torch.long)
        return VectorDataset(self.points[c, j], records.labels, records.paths, transform)


def as_tensor(x):
    """Identity for tensors; a PIL image becomes a float (3, H, W) tensor in [0, 1] (no augmentation)."""
    if isinstance(x, torch.Tensor):
        return x
    from ddtas_lightning.data.image_dataset import _default_to_tensor

    return _default_to_tensor(x)


class IdentityTransform(TransformPair):
    """``transform=none``: no preprocessing for vector data (and plain to-tensor for images)."""

    def __init__(self) -> None:
        self.train = self.test = as_tensor


__all__ = ["GaussianClusters", "IdentityTransform", "RowDataset", "VectorDataset", "as_tensor", "gaussian_clusters"]
