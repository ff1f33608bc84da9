"""Layout loaders on miniature trees: counts, labels, class-disjoint splits, and one clear error per bad input."""

from __future__ import annotations

import logging
import re

import pytest

from ddtas_lightning.data import CUB200, SOP, Cars196, DatasetLayoutError, Folder, InShop


def assert_disjoint(source):
    tr, te = source.load("train"), source.load("test")
    assert not set(tr.labels) & set(te.labels)
    assert not set(tr.paths) & set(te.paths)
    assert all(p.is_file() for p in tr.paths + te.paths)
    return tr, te


# --- CUB-200-2011 ---------------------------------------------------------------------------------
def test_cub_counts_labels_and_split(cub_tree):
    d = cub_tree(num_classes=4, per_class=3)
    tr, te = assert_disjoint(CUB200(d))
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (6, 2, 6, 2)
    assert sorted(set(tr.labels)) == [1, 2] and sorted(set(te.labels)) == [3, 4]  # raw 1-based ids
    assert tr.is_query is None and tr.is_gallery is None
    assert tr.paths[0].name == "Bird_1_0000.jpg"


def test_cub_accepts_parent_and_train_classes(cub_tree, tmp_path):
    cub_tree(num_classes=4, per_class=2)
    assert len(CUB200(tmp_path).load("train")) == 4  # the parent of CUB_200_2011/
    assert sorted(set(CUB200(tmp_path, train_classes=3).load("train").labels)) == [1, 2, 3]
    assert sorted(set(CUB200(tmp_path, train_classes=[2, 4]).load("test").labels)) == [1, 3]
    with pytest.raises(DatasetLayoutError, match=r"train_classes names class ids \[9\]"):
        CUB200(tmp_path, train_classes=[1, 9]).load("train")
    with pytest.raises(ValueError, match="train_classes=4"):
        CUB200(tmp_path, train_classes=4).load("train")
    with pytest.raises(ValueError, match="split must be one of"):
        CUB200(tmp_path).load("val")


def test_cub_root_missing(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"does not exist; expected layout: CUB_200_2011/\{images.txt"):
        CUB200(tmp_path / "nowhere").load("train")
    with pytest.raises(DatasetLayoutError, match="no images.txt in"):
        CUB200(tmp_path).load("train")


def test_cub_missing_file(cub_tree):
    d = cub_tree()
    (d / "classes.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"classes.txt is missing; expected layout"):
        CUB200(d).load("train")


def test_cub_listed_image_missing(cub_tree):
    d = cub_tree()
    (d / "images/002.Bird_2/Bird_2_0001.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 12 images listed in .*images.txt are missing: "
                                                 r".*Bird_2_0001.jpg"):
        CUB200(d).load("train")
    assert len(CUB200(d, check_images=False).load("train")) == 6  # the existence check can be skipped


def test_cub_id_mismatch(cub_tree):
    d = cub_tree()
    lines = (d / "image_class_labels.txt").read_text().splitlines()
    (d / "image_class_labels.txt").write_text("\n".join(lines[:-1] + ["99 4"]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"image ids disagree between .*images.txt and "
                                                 r".*image_class_labels.txt: 1 ids only in images.txt "
                                                 r"\(e.g. \[12\]\), 1 only in image_class_labels.txt \(e.g. \[99\]\)"):
        CUB200(d).load("train")


def test_cub_unknown_class_and_empty_class(cub_tree):
    d = cub_tree()
    text = (d / "image_class_labels.txt").read_text()
    (d / "image_class_labels.txt").write_text(text.replace("\n12 4\n", "\n12 7\n"))
    with pytest.raises(DatasetLayoutError, match=r"uses class ids \[7\] that are not in .*classes.txt"):
        CUB200(d).load("train")
    (d / "image_class_labels.txt").write_text(text)
    (d / "classes.txt").write_text((d / "classes.txt").read_text() + "5 005.Empty\n")
    with pytest.raises(DatasetLayoutError, match=r"classes \['5 005.Empty'\] listed in .*classes.txt have no "
                                                 r"images"):
        CUB200(d).load("train")


def test_cub_malformed_and_duplicate_lines(cub_tree):
    d = cub_tree()
    good = (d / "images.txt").read_text()
    (d / "images.txt").write_text(good + "thirteen 004.Bird_4/x.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"images.txt line 13 is 'thirteen 004.Bird_4/x.jpg'; "
                                                 r"expected '<id> <name>'"):
        CUB200(d).load("train")
    (d / "images.txt").write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(DatasetLayoutError, match="images.txt line 13: id 1 is listed twice"):
        CUB200(d).load("train")


def test_cub_full_size_count_warning(tmp_path, caplog):
    """A 200-class tree whose counts differ from the published ones warns (and still loads)."""
    d = tmp_path / "CUB_200_2011"
    (d / "images").mkdir(parents=True)
    (d / "images.txt").write_text("".join(f"{c} {c:03d}.B/x.jpg\n" for c in range(1, 201)))
    (d / "image_class_labels.txt").write_text("".join(f"{c} {c}\n" for c in range(1, 201)))
    (d / "classes.txt").write_text("".join(f"{c} {c:03d}.B\n" for c in range(1, 201)))
    with caplog.at_level(logging.WARNING):
        tr = CUB200(d, check_images=False).load("train")
    assert len(tr) == 100
    assert "train_images: 100 (expected 5864)" in caplog.text
    caplog.clear()
    small = tmp_path / "small"
    (small / "CUB_200_2011" / "images").mkdir(parents=True)
    for name in ("images.txt", "image_class_labels.txt", "classes.txt"):
        lines = (d / name).read_text().splitlines()[:4]
        (small / "CUB_200_2011" / name).write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        CUB200(small, check_images=False).load("train")
    assert "expected" not in caplog.text  # miniature trees do not warn


# --- Cars196 ------------------------------------------------------------------------------------
def test_cars_counts_and_split(cars_tree):
    src = Cars196(cars_tree(num_classes=6, per_class=2))
    tr, te = assert_disjoint(src)
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (6, 3, 6, 3)
    assert sorted(set(tr.labels)) == [1, 2, 3]  # the 'test' field (classification split) is ignored
    assert src.class_names[1] == "Make Model 1 2012"
    assert tr.paths[0].relative_to(src.root).as_posix() == "car_ims/000001.jpg"


def test_cars_errors(cars_tree, tmp_path, helpers):
    cars_annos, write_image = helpers.cars_annos, helpers.write_image
    from scipy.io import savemat

    with pytest.raises(DatasetLayoutError, match="Cars196 root .* does not exist"):
        Cars196(tmp_path / "nope").load("train")
    root = cars_tree()
    (root / "car_ims" / "000005.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"listed in .*cars_annos.mat are missing: .*000005.jpg"):
        Cars196(root).load("train")
    write_image(root / "car_ims" / "000005.jpg")
    # A class of class_names without images.
    annos, _ = cars_annos(4, 3)
    _, names = cars_annos(5, 1)
    savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
    with pytest.raises(DatasetLayoutError, match=r"cars_annos.mat: classes \[5\] of 'class_names' have no image"):
        Cars196(root).load("train")
    # Class ids beyond class_names.
    _, names = cars_annos(3, 1)
    savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
    with pytest.raises(DatasetLayoutError, match=r"annotations use class ids \[4\] outside 1..3"):
        Cars196(root).load("train")
    # Missing field.
    from numpy.lib.recfunctions import repack_fields

    savemat(root / "cars_annos.mat", {"annotations": repack_fields(annos[["relative_im_path", "test"]])})
    with pytest.raises(DatasetLayoutError, match=r"'annotations' lacks fields \['class'\]"):
        Cars196(root).load("train")
    # Not a .mat file at all.
    (root / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetLayoutError, match="cannot read .*cars_annos.mat"):
        Cars196(root).load("train")


def test_cars_without_class_names(cars_tree, helpers):
    from scipy.io import savemat

    root = cars_tree(num_classes=4, per_class=1)
    annos, _ = helpers.cars_annos(4, 1)
    savemat(root / "cars_annos.mat", {"annotations": annos})
    assert Cars196(root).load("test").labels == [3, 4]


# --- SOP ----------------------------------------------------------------------------------------
def test_sop_counts_and_split(sop_tree, tmp_path):
    d = sop_tree(n_train=3, n_test=3)
    for root in (d, tmp_path):  # the dataset folder or its parent
        src = SOP(root)
        tr, te = assert_disjoint(src)
        assert (len(tr), tr.num_classes, len(te), te.num_classes) == (8, 3, 7, 3)
        assert tr.labels[:2] == [1, 1] and sorted(set(te.labels)) == [4, 5, 6]
        assert src.super_labels["train"] == [1, 1, 1, 2, 2, 3, 3, 3]
        assert tr.paths[0] == d / "bicycle_final" / "000001_0.JPG"


def test_sop_errors(sop_tree, tmp_path):
    with pytest.raises(DatasetLayoutError, match="SOP root .* does not exist"):
        SOP(tmp_path / "nope").load("train")
    d = sop_tree()
    good = (d / "Ebay_test.txt").read_text()
    (d / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"Ebay_test.txt is missing; expected layout"):
        SOP(d).load("train")
    (d / "Ebay_test.txt").write_text(good.replace("image_id class_id super_class_id path", "id class path"))
    with pytest.raises(DatasetLayoutError, match=r"Ebay_test.txt starts with 'id class path'; expected the header"):
        SOP(d).load("train")
    (d / "Ebay_test.txt").write_text(good + "99 7 1 bicycle_final/ghost.JPG\n")
    with pytest.raises(DatasetLayoutError, match=r"images listed in .*Ebay_test.txt are missing: "
                                                 r".*ghost.JPG"):
        SOP(d).load("test")
    (d / "Ebay_test.txt").write_text(good + "99 2 1 bicycle_final/000001_0.JPG\n")
    with pytest.raises(DatasetLayoutError, match=r"class ids \[2\] appear in both .*Ebay_train.txt and "
                                                 r".*Ebay_test.txt"):
        SOP(d).load("test")
    (d / "Ebay_test.txt").write_text(good + "99 seven 1 x.JPG\n")
    with pytest.raises(DatasetLayoutError, match=r"Ebay_test.txt line \d+ is '99 seven 1 x.JPG'"):
        SOP(d).load("test")


# --- In-Shop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("eval_subdir", [False, True])
def test_inshop_query_gallery(inshop_tree, eval_subdir):
    src = InShop(inshop_tree(eval_subdir=eval_subdir))
    tr, te = assert_disjoint(src)
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (9, 3, 9, 3)
    assert tr.is_query is None
    assert sum(te.is_query) == 3 and sum(te.is_gallery) == 6
    assert all(q != g for q, g in zip(te.is_query, te.is_gallery))  # each image exactly one role
    q, g = te.query_gallery()
    assert q.dtype == g.dtype == __import__("torch").bool
    assert sorted(set(te.labels)) == [4, 5, 6]
    assert te.paths[0].relative_to(src.root).as_posix() == "img/WOMEN/Dresses/id_00000004/00_1_front.jpg"


def test_inshop_errors(inshop_tree, tmp_path):
    with pytest.raises(DatasetLayoutError, match="In-Shop root .* does not exist"):
        InShop(tmp_path / "nope").load("train")
    with pytest.raises(DatasetLayoutError, match="no list_eval_partition.txt in"):
        InShop(tmp_path).load("train")
    root = inshop_tree()
    part = root / "list_eval_partition.txt"
    good = part.read_text()
    part.write_text(good.replace("18\n", "20\n", 1))
    with pytest.raises(DatasetLayoutError, match="announces 20 images but lists 18"):
        InShop(root).load("train")
    part.write_text(good.replace("id_00000005   query", "id_00000005   probe"))
    with pytest.raises(DatasetLayoutError, match=r"line \d+ is .*probe.*expected '<image_name> id_<number> "
                                                 r"train\|query\|gallery'"):
        InShop(root).load("train")
    part.write_text(good.replace("img/WOMEN/Dresses/id_00000006/02_1_front.jpg",
                                 "img/WOMEN/Dresses/id_00000006/ghost.jpg"))
    with pytest.raises(DatasetLayoutError, match=r"images listed in .*list_eval_partition.txt are missing: "
                                                 r".*ghost.jpg"):
        InShop(root).load("test")
    # An item with both train and test images.
    part.write_text(good.replace("id_00000004/00_1_front.jpg   id_00000004",
                                 "id_00000004/00_1_front.jpg   id_00000001"))
    with pytest.raises(DatasetLayoutError, match=r"items \[1\] have both train and query/gallery images"):
        InShop(root).load("test")


def test_inshop_official_img_folder(inshop_tree):
    """The official release keeps images under Img/img/...; paths in the file start with img/."""
    root = inshop_tree(eval_subdir=True)
    (root / "Img").mkdir()
    (root / "img").rename(root / "Img" / "img")
    te = InShop(root).load("test")
    assert all(p.is_file() for p in te.paths) and te.paths[0].parts[-6] == "Img"


# --- Folder -------------------------------------------------------------------------------------
def test_folder_sorted_half_and_fraction(folder_tree):
    root = folder_tree(num_classes=4, per_class=2)
    src = Folder(root)
    tr, te = assert_disjoint(src)
    assert (len(tr), len(te)) == (4, 4)  # the stray notes.txt is ignored
    assert sorted(set(tr.labels)) == [0, 1] and src.class_names[3] == "c3"
    assert sorted(set(Folder(root, split=0.75).load("train").labels)) == [0, 1, 2]
    assert sorted(set(Folder(root, split="0.25").load("test").labels)) == [1, 2, 3]
    with pytest.raises(DatasetLayoutError, match="puts 0 of the 4 classes"):
        Folder(root, split=0.1).load("train")


@pytest.mark.parametrize("fmt", ["yaml", "txt"])
def test_folder_split_file(folder_tree, tmp_path, fmt, caplog):
    root = folder_tree(num_classes=4)
    f = tmp_path / f"split.{fmt}"
    if fmt == "yaml":
        f.write_text("train: [c3, c1]\ntest: [c0]\n")
    else:
        f.write_text("train c3\ntrain c1\ntest c0\n")
    with caplog.at_level(logging.WARNING):
        tr, te = assert_disjoint(Folder(root, split=str(f)))
    assert sorted(set(tr.labels)) == [1, 3] and set(te.labels) == {0}
    assert "neither side for 1 class folders" in caplog.text  # c2 is left out


def test_folder_errors(folder_tree, tmp_path):
    with pytest.raises(DatasetLayoutError, match="image folder root .* does not exist"):
        Folder(tmp_path / "nope").load("train")
    root = folder_tree()
    (root / "c9").mkdir()
    with pytest.raises(DatasetLayoutError, match=re.escape(f"class folder {root / 'c9'} has no image")):
        Folder(root).load("train")
    (root / "c9").rmdir()
    f = tmp_path / "split.yaml"
    f.write_text("train: [c0, zebra]\ntest: [c1]\n")
    with pytest.raises(DatasetLayoutError, match=r"split file .*split.yaml names train classes \['zebra'\] that "
                                                 r"are not class folders"):
        Folder(root, split=str(f)).load("train")
    f.write_text("train: [c0, c1]\ntest: [c1]\n")
    with pytest.raises(DatasetLayoutError, match=r"puts classes \['c1'\] in both train and test"):
        Folder(root, split=str(f)).load("train")
    f.write_text("train: [c0]\n")
    with pytest.raises(DatasetLayoutError, match="lists no test class"):
        Folder(root, split=str(f)).load("train")
    f.write_text("- c0\n")
    with pytest.raises(DatasetLayoutError, match="is not a mapping of 'train'/'test'"):
        Folder(root, split=str(f)).load("train")
    txt = tmp_path / "split.txt"
    txt.write_text("train c0\nvalidation c1\n")
    with pytest.raises(DatasetLayoutError, match=r"split.txt line 2 is 'validation c1'"):
        Folder(root, split=str(txt)).load("train")
    with pytest.raises(DatasetLayoutError, match="split file .*missing.yaml does not exist"):
        Folder(root, split=str(tmp_path / "missing.yaml")).load("train")


def test_expected_counts_documented():
    assert CUB200.expected_counts == {"train_images": 5864, "train_classes": 100, "test_images": 5924,
                                      "test_classes": 100}
    assert Cars196.expected_counts["train_images"] + Cars196.expected_counts["test_images"] == 16185
    assert SOP.expected_counts["train_classes"] == 11318 and SOP.expected_counts["test_images"] == 60502
    assert InShop.expected_counts["query_images"] == 14218 and InShop.expected_counts["gallery_images"] == 12612
    for cls in (CUB200, Cars196, SOP, InShop):
        for v in cls.expected_counts.values():
            assert f"{v:,}" in cls.__doc__ or str(v) in cls.__doc__
