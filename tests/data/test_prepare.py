"""python -m ddtas_lightning.data.prepare on small fake archives and folders: the right tree lands in data/,
and a missing file or image is named before (or instead of) anything being written."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest

from ddtas_lightning.data.cub200 import CUB200
from ddtas_lightning.data.prepare import main, prepare
from ddtas_lightning.data.records import DatasetLayoutError


def make_tar(src: Path, out: Path, arcname: str | None = None) -> Path:
    with tarfile.open(out, "w:gz") as t:
        t.add(src, arcname=arcname or src.name)
    return out


def make_zip(src: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(src.parent).as_posix())
    return out


def test_cub_archive_is_checked_unpacked_and_loadable(cub_tree, tmp_path, capsys):
    cub = cub_tree(num_classes=4, per_class=3, parent=tmp_path / "download")
    archive = make_tar(cub, tmp_path / "CUB_200_2011.tgz")
    data = tmp_path / "data"
    assert main(["cub200", str(archive), "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "train_images 6, train_classes 2, test_images 6, test_classes 2" in out
    assert "counts differ from the published dataset (train_images 6, published 5864;" in out  # a subset
    records = CUB200(data / "CUB_200_2011").load("train")
    assert len(records) == 6 and all(p.is_file() for p in records.paths)
    assert not any(p.name.startswith(".") for p in data.iterdir())  # no staging left behind
    # a second run does not overwrite silently
    assert main(["cub200", str(archive), "--data-dir", str(data)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["cub200", str(archive), "--data-dir", str(data), "--force"]) == 0


def test_missing_annotation_file_is_named_and_nothing_is_written(cub_tree, tmp_path):
    cub = cub_tree(parent=tmp_path / "download")
    (cub / "image_class_labels.txt").unlink()
    archive = make_tar(cub, tmp_path / "cub.tgz")
    data = tmp_path / "data"
    with pytest.raises(DatasetLayoutError, match=r"image_class_labels.txt not found in .*cub.tgz.*Nothing was written"):
        prepare("cub200", [archive], data)
    assert not data.exists() or not any(data.iterdir())


def test_missing_images_are_counted_and_named(cub_tree, tmp_path, capsys):
    cub = cub_tree(num_classes=2, per_class=3, parent=tmp_path / "download")
    victim = sorted((cub / "images").rglob("*.jpg"))[0]
    victim.unlink()
    archive = make_zip(cub, tmp_path / "cub.zip", prefix="outer/")  # any folder around the dataset
    assert main(["cub200", str(archive), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 of 6 images listed in") and victim.name in err


def test_cars196_from_two_sources(cars_tree, tmp_path):
    cars = cars_tree(num_classes=4, per_class=2)
    images = make_tar(cars / "car_ims", tmp_path / "car_ims.tgz")
    target = prepare("cars196", [images, cars / "cars_annos.mat"], tmp_path / "data")
    assert target == tmp_path / "data" / "cars196"
    assert (target / "cars_annos.mat").is_file() and len(list((target / "car_ims").glob("*.jpg"))) == 8
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat not found"):
        prepare("cars196", [images], tmp_path / "data2")


def test_sop_zip_and_inshop_folder(sop_tree, inshop_tree, tmp_path, capsys):
    sop = sop_tree()
    prepare("sop", [make_zip(sop, tmp_path / "Stanford_Online_Products.zip")], tmp_path / "data")
    assert (tmp_path / "data" / "Stanford_Online_Products" / "Ebay_test.txt").is_file()
    shop = inshop_tree(eval_subdir=True)
    target = prepare("inshop", [shop], tmp_path / "data")
    assert target.is_symlink() and target.resolve() == shop.resolve()  # a folder is linked, not copied
    assert "query_images 3, test_classes 3" in capsys.readouterr().out.replace("gallery_images 6, ", "")


def test_archive_members_outside_the_target_are_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("CUB_200_2011/images.txt", "1 a/b.jpg\n")
        z.writestr("CUB_200_2011/image_class_labels.txt", "1 1\n")
        z.writestr("CUB_200_2011/classes.txt", "1 a\n")
        z.writestr("CUB_200_2011/images/a/b.jpg", "x")
        z.writestr("../../escape.txt", "x")
    with pytest.raises(DatasetLayoutError, match="outside"):
        prepare("cub200", [archive], tmp_path / "data")
    assert not (tmp_path / "escape.txt").exists()
