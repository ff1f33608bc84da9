"""Miniature dataset trees in each loader's genuine layout (tiny real PNG/JPEG files)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    """A tiny real image; the format follows the suffix (.jpg -> JPEG, .png -> PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


def corrupt(path: Path) -> Path:
    """Overwrite an image with bytes PIL cannot decode (a PNG signature followed by garbage)."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 4)
    return path


@pytest.fixture
def helpers():
    """The module's helper functions (tests cannot import a conftest module reliably)."""
    return SimpleNamespace(write_image=write_image, corrupt=corrupt, cars_annos=cars_annos)


@pytest.fixture
def cub_tree(tmp_path):
    """``make(num_classes=4, per_class=3)`` -> the ``CUB_200_2011`` folder of a miniature CUB tree."""

    def make(num_classes: int = 4, per_class: int = 3, parent: Path | None = None) -> Path:
        d = (parent or tmp_path) / "CUB_200_2011"
        images, labels, classes = [], [], []
        k = 0
        for c in range(1, num_classes + 1):
            cname = f"{c:03d}.Bird_{c}"
            classes.append(f"{c} {cname}")
            for j in range(per_class):
                k += 1
                rel = f"{cname}/Bird_{c}_{j:04d}.jpg"
                write_image(d / "images" / rel, seed=k)
                images.append(f"{k} {rel}")
                labels.append(f"{k} {c}")
        (d / "images.txt").write_text("\n".join(images) + "\n")
        (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
        (d / "classes.txt").write_text("\n".join(classes) + "\n")
        # The classification split exists in the real tree and must be ignored.
        (d / "train_test_split.txt").write_text("\n".join(f"{i} {i % 2}" for i in range(1, k + 1)) + "\n")
        return d

    return make


def cars_annos(num_classes: int, per_class: int, class_names: int | None = None):
    """``(annotations, class_names)`` arrays in the genuine ``cars_annos.mat`` struct layout."""
    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
              ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    n = num_classes * per_class
    annos = np.zeros((1, n), dtype=fields)
    k = 0
    for c in range(1, num_classes + 1):
        for _ in range(per_class):
            k += 1
            annos[0, k - 1] = (f"car_ims/{k:06d}.jpg", np.uint8(1), np.uint8(2), np.uint16(7), np.uint8(7),
                               np.uint8(c), np.uint8(k % 2))
    names = np.empty((1, class_names or num_classes), dtype=object)
    names[0] = [f"Make Model {c} 2012" for c in range(1, (class_names or num_classes) + 1)]
    return annos, names


@pytest.fixture
def cars_tree(tmp_path):
    def make(num_classes: int = 4, per_class: int = 3, class_names: int | None = None) -> Path:
        from scipy.io import savemat

        root = tmp_path / "cars196"
        annos, names = cars_annos(num_classes, per_class, class_names)
        for k in range(1, annos.shape[1] + 1):
            write_image(root / "car_ims" / f"{k:06d}.jpg", seed=k)
        savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
        return root

    return make


SOP_SUPER = ("bicycle", "chair", "mug")


@pytest.fixture
def sop_tree(tmp_path):
    """Train classes 1..n_train, test classes n_train+1..; 2-3 images each, paths '<super>_final/<file>'."""

    def make(n_train: int = 3, n_test: int = 3) -> Path:
        d = tmp_path / "Stanford_Online_Products"
        k = 0
        for split, classes in (("train", range(1, n_train + 1)),
                               ("test", range(n_train + 1, n_train + n_test + 1))):
            lines = ["image_id class_id super_class_id path"]
            image_id = 0
            for c in classes:
                sup = (c - 1) % len(SOP_SUPER)
                for j in range(2 + c % 2):
                    k += 1
                    image_id += 1
                    rel = f"{SOP_SUPER[sup]}_final/{c:06d}_{j}.JPG"
                    write_image(d / rel, seed=k)
                    lines.append(f"{image_id} {c} {sup + 1} {rel}")
            (d / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
        return d

    return make


@pytest.fixture
def inshop_tree(tmp_path):
    """Items 1-3 train (3 images each); items 4-6 test with 1 query + 2 gallery images each."""

    def make(eval_subdir: bool = False) -> Path:
        root = tmp_path / "inshop"
        rows = []
        k = 0
        for item in range(1, 7):
            for j in range(3):
                k += 1
                rel = f"img/WOMEN/Dresses/id_{item:08d}/{j:02d}_1_front.jpg"
                write_image(root / rel, seed=k)
                status = "train" if item <= 3 else ("query" if j == 0 else "gallery")
                rows.append(f"{rel}   id_{item:08d}   {status}")
        part = root / ("Eval" if eval_subdir else "") / "list_eval_partition.txt"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
        return root

    return make


@pytest.fixture
def folder_tree(tmp_path):
    """``root/<class>/<image>`` with classes named c0..c{n-1} (plus a stray non-image file)."""

    def make(num_classes: int = 4, per_class: int = 2) -> Path:
        root = tmp_path / "folder"
        for c in range(num_classes):
            for j in range(per_class):
                write_image(root / f"c{c}" / f"img{j}.png", seed=c * 10 + j)
        (root / "c0" / "notes.txt").write_text("not an image")
        return root

    return make
