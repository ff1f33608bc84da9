"""Downloads are untrusted (docs/security.md): archives with links, devices or bombs, index files whose paths
leave the dataset root, a ``--force`` onto a broken archive, truncated archives, and split files with
escaped emoji. Every test writes its own tiny tree."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ddtas_lightning.data.cars196 import Cars196
from ddtas_lightning.data.cub200 import CUB200
from ddtas_lightning.data.folder import Folder
from ddtas_lightning.data.inshop import InShop
from ddtas_lightning.data.prepare import Limits, _Budget, _write_member, main, prepare
from ddtas_lightning.data.records import DatasetLayoutError
from ddtas_lightning.data.sop import SOP
from tests.data.conftest import cars_annos, write_image
from tests.data.test_prepare import make_tar


def _add(t: tarfile.TarFile, name: str, *, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
         link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if data is not None:
        info.size = len(data)
    t.addfile(info, io.BytesIO(data) if data is not None else None)


def _cub_tar(cub: Path, out: Path, extra) -> Path:
    """The CUB tree ``cub`` as a .tar, then ``extra(tarfile)`` appends hostile members."""
    with tarfile.open(out, "w") as t:
        t.add(cub, arcname="CUB_200_2011")
        extra(t)
    return out


def _nothing_installed(data: Path) -> bool:
    return not data.exists() or not any(data.iterdir())


# ---- item 3: links, devices and FIFOs in a tar -----------------------------------------------------------
@pytest.mark.parametrize("members, refused", [
    # CVE-2025-4517's shape: a chain of symlinks (each step inside the folder) whose expanded path leaves it,
    # then a file written through the chain
    (lambda t: (_add(t, "CUB_200_2011/a", kind=tarfile.SYMTYPE, link="."),
                _add(t, "CUB_200_2011/b", kind=tarfile.SYMTYPE, link="a/a/a/a/.."),
                _add(t, "CUB_200_2011/c", kind=tarfile.SYMTYPE, link="b/../.."),
                _add(t, "CUB_200_2011/c/pwned.txt", data=b"owned")), "is a symbolic link to '.'"),
    (lambda t: _add(t, "CUB_200_2011/inside", kind=tarfile.SYMTYPE, link="images"), "is a symbolic link"),
    (lambda t: (_add(t, "CUB_200_2011/hl", kind=tarfile.LNKTYPE, link="CUB_200_2011/images.txt"),),
     "is a hard link to 'CUB_200_2011/images.txt'"),
    (lambda t: _add(t, "CUB_200_2011/dev", kind=tarfile.CHRTYPE), "is a device file"),
    (lambda t: _add(t, "CUB_200_2011/fifo", kind=tarfile.FIFOTYPE), "is a FIFO"),
    (lambda t: _add(t, "../../pwned.txt", data=b"owned"), "would be written outside"),
    (lambda t: _add(t, "/tmp/pwned-abs.txt", data=b"owned"), "would be written outside"),
], ids=["symlink-chain", "symlink-inside", "hardlink", "device", "fifo", "dotdot", "absolute"])
def test_tar_links_devices_and_escapes_are_refused_and_nothing_is_written(cub_tree, tmp_path, members, refused):
    cub = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "download")
    archive = _cub_tar(cub, tmp_path / "evil.tar", members)
    data = tmp_path / "work" / "data"
    with pytest.raises(DatasetLayoutError, match=refused):
        prepare("cub200", [archive], data)
    assert _nothing_installed(data)
    assert not list(tmp_path.rglob("pwned*")) and not Path("/tmp/pwned-abs.txt").exists()


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("CUB_200_2011/images.txt", "1 a/b.jpg\n")
        z.writestr("CUB_200_2011/image_class_labels.txt", "1 1\n")
        z.writestr("CUB_200_2011/classes.txt", "1 a\n")
        info = zipfile.ZipInfo("CUB_200_2011/images/a/b.jpg")
        info.external_attr = (0o120777 << 16)  # S_IFLNK: unzip would make it a link to /etc/passwd
        z.writestr(info, "/etc/passwd")
    with pytest.raises(DatasetLayoutError, match="is a symbolic link"):
        prepare("cub200", [archive], tmp_path / "data")


# ---- item 5: bombs ---------------------------------------------------------------------------------------
def _zeros_zip(path: Path, mib: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("CUB_200_2011/images.txt", "1 a/b.jpg\n")
        z.writestr("CUB_200_2011/image_class_labels.txt", "1 1\n")
        z.writestr("CUB_200_2011/classes.txt", "1 a\n")
        z.writestr("CUB_200_2011/images/a/b.jpg", b"\0" * (mib * 2**20))
    return path


def test_zip_of_zeros_is_refused_by_the_size_cap_before_writing(tmp_path):
    archive = _zeros_zip(tmp_path / "bomb.zip", 2)
    with pytest.raises(DatasetLayoutError, match=r"announces 2.0 MiB, more than the limit of 1.0 MiB; refused"):
        prepare("cub200", [archive], tmp_path / "data", limits=Limits(max_bytes=2**20))
    assert _nothing_installed(tmp_path / "data")


def test_zip_of_zeros_is_refused_by_the_ratio(tmp_path):
    archive = _zeros_zip(tmp_path / "bomb.zip", 2)  # ~2 KiB compressed: a ratio near 1000
    with pytest.raises(DatasetLayoutError, match=r"announces 2.0 MiB from a \d+.\d KiB archive, a ratio of \d+ \(limit 100 beyond 1.0 MiB\)"):
        prepare("cub200", [archive], tmp_path / "data", limits=Limits(max_ratio=100, ratio_floor=2**20))
    assert _nothing_installed(tmp_path / "data")


def test_cli_cap_flag(tmp_path, capsys):
    archive = _zeros_zip(tmp_path / "bomb.zip", 2)
    assert main(["cub200", str(archive), "--data-dir", str(tmp_path / "d"), "--max-unpacked-gib", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "more than the limit of 1.0 MiB" in err[0] and "--max-unpacked-gib" in err[0]


def test_headers_that_lie_are_caught_while_writing(tmp_path):
    """The copy counts bytes itself: a member delivering more than its header announced is stopped, and the
    running total is held to the cap whatever the headers said."""
    source = tmp_path / "a.tar"
    source.write_bytes(b"x" * 100)
    budget = _Budget(source, Limits(max_bytes=10 * 2**20))
    with pytest.raises(DatasetLayoutError, match="more than the 10 bytes its header announces"):
        _write_member(io.BytesIO(b"y" * 11), tmp_path / "out" / "f", 10, budget, source, "f")
    budget = _Budget(source, Limits(max_bytes=2**20, max_ratio=1e9))
    with pytest.raises(DatasetLayoutError, match="expands to more than"):
        _write_member(io.BytesIO(b"z" * (2 * 2**20)), tmp_path / "out" / "g", 4 * 2**20, budget, source, "g")


# ---- item 6: --force validates before it replaces ----------------------------------------------------------
def test_failed_force_keeps_the_old_tree_and_the_users_files(cub_tree, tmp_path):
    good = make_tar(cub_tree(num_classes=2, per_class=2, parent=tmp_path / "good"), tmp_path / "good.tgz")
    data = tmp_path / "data"
    target = prepare("cub200", [good], data)
    (target / "my_notes.txt").write_text("mine")
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    broken_tree = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "broken")
    next(iter(sorted((broken_tree / "images").rglob("*.jpg")))).unlink()  # a listed image is missing
    broken = make_tar(broken_tree, tmp_path / "broken.tgz")
    with pytest.raises(DatasetLayoutError, match=r"1 of 4 images listed in .* are missing.*nothing was installed; "
                                                 r".*CUB_200_2011 is left as it was"):
        prepare("cub200", [broken], data, force=True)
    assert (target / "my_notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert [p.name for p in data.iterdir()] == ["CUB_200_2011"]  # no staging, no aside copy
    # a good --force replaces it (the user's extra file goes with the old tree: that is what --force means)
    prepare("cub200", [good], data, force=True)
    assert not (target / "my_notes.txt").exists() and [p.name for p in data.iterdir()] == ["CUB_200_2011"]


def test_failed_force_with_a_folder_source_keeps_the_old_link(cub_tree, tmp_path):
    good = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "good")
    data = tmp_path / "data"
    target = prepare("cub200", [good], data)
    broken = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "broken")
    (broken / "images.txt").write_text((broken / "images.txt").read_text() + "5 nowhere/x.jpg\n")
    with pytest.raises(DatasetLayoutError):
        prepare("cub200", [broken], data, force=True)
    assert target.is_symlink() and target.resolve() == good.resolve()


def test_a_folder_among_several_sources_is_copied_not_moved(cars_tree, tmp_path):
    cars = cars_tree(num_classes=2, per_class=2)
    images = make_tar(cars / "car_ims", tmp_path / "car_ims.tgz")
    annos_dir = tmp_path / "annos"
    annos_dir.mkdir()
    (annos_dir / "cars_annos.mat").write_bytes((cars / "cars_annos.mat").read_bytes())
    prepare("cars196", [images, annos_dir], tmp_path / "data")
    assert (annos_dir / "cars_annos.mat").is_file()  # the user's folder is left as it was


# ---- truncated archives: one error line ----------------------------------------------------------------
def test_truncated_tgz_is_one_error_line(cub_tree, tmp_path, capsys):
    archive = make_tar(cub_tree(num_classes=2, per_class=2, parent=tmp_path / "dl"), tmp_path / "cub.tgz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert main(["cub200", str(archive), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {archive}: the archive is truncated or corrupt"), err
    assert _nothing_installed(tmp_path / "data")


# ---- item 4: index files whose paths leave the dataset root --------------------------------------------
def _outside_image(tmp_path: Path) -> Path:
    return write_image(tmp_path / "outside" / "secret.jpg", seed=99)


def _edit_line(path: Path, i: int, new) -> int:
    """Line ``i`` (0-based, negative from the end) of the index file ``path`` replaced by ``new``, a string or
    a function of the old line; returns its 1-based number (as the loaders' errors count)."""
    lines = path.read_text().splitlines()
    lines[i] = new(lines[i]) if callable(new) else new
    path.write_text("\n".join(lines) + "\n")
    return i % len(lines) + 1


def test_cub_images_txt_path_outside_the_root(cub_tree, tmp_path):
    cub = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "ds")
    _outside_image(tmp_path)  # exists: without the check the loader would read it as a bird
    _edit_line(cub / "images.txt", 2, "3 ../../../outside/secret.jpg")
    with pytest.raises(DatasetLayoutError, match=r"images.txt line 3: path '../../../outside/secret.jpg' points "
                                                 r"outside the dataset root .*images"):
        CUB200(cub).load("train")


def test_cub_absolute_path(cub_tree, tmp_path):
    cub = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "ds")
    secret = _outside_image(tmp_path)
    _edit_line(cub / "images.txt", 0, f"1 {secret}")
    with pytest.raises(DatasetLayoutError, match=rf"images.txt line 1: path '{secret}' points outside"):
        CUB200(cub).load("train")


def test_cars_annotation_path_outside_the_root(tmp_path):
    from scipy.io import savemat

    _outside_image(tmp_path)
    root = tmp_path / "cars196"
    annos, names = cars_annos(2, 2)
    for k in range(1, 5):
        write_image(root / "car_ims" / f"{k:06d}.jpg", seed=k)
    annos[0, 3]["relative_im_path"] = "../outside/secret.jpg"
    savemat(root / "cars_annos.mat", {"annotations": annos, "class_names": names})
    with pytest.raises(DatasetLayoutError, match=r"cars_annos.mat annotation 4 \(relative_im_path\): path "
                                                 r"'../outside/secret.jpg' points outside"):
        Cars196(root).load("train")


def test_sop_line_outside_the_root(sop_tree, tmp_path):
    sop = sop_tree()
    _outside_image(tmp_path)
    last = _edit_line(sop / "Ebay_test.txt", -1, lambda line: " ".join(line.split()[:3] + ["../outside/secret.jpg"]))
    with pytest.raises(DatasetLayoutError, match=rf"Ebay_test.txt line {last}: path "
                                                 r"'../outside/secret.jpg' points outside"):
        SOP(sop).load("test")


def test_inshop_line_outside_the_root(inshop_tree, tmp_path):
    root = inshop_tree()
    _outside_image(tmp_path)
    _edit_line(root / "list_eval_partition.txt", 5, "img/../../outside/secret.jpg   id_00000002   train")
    with pytest.raises(DatasetLayoutError, match=r"list_eval_partition.txt line 6: path "
                                                 r"'img/../../outside/secret.jpg' points outside"):
        InShop(root).load("train")


def test_dotdot_that_stays_inside_is_fine(cub_tree, tmp_path):
    cub = cub_tree(num_classes=2, per_class=2, parent=tmp_path / "ds")

    def via_dotdot(line: str) -> str:
        first = line.split(maxsplit=1)[1]
        return f"1 {first.split('/')[0]}/../{first}"

    _edit_line(cub / "images.txt", 0, via_dotdot)
    assert len(CUB200(cub).load("train")) == 2


# ---- split files: a class name escaped as a UTF-16 surrogate pair --------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_split_file_with_an_escaped_emoji_class_name(tmp_path, suffix):
    root = tmp_path / "imgs"
    for i, name in enumerate(["\U0001f426", "b", "c", "d"]):  # a bird emoji folder
        for j in range(2):
            write_image(root / name / f"{j}.png", seed=10 * i + j)
    split = tmp_path / f"split{suffix}"
    text = json.dumps({"train": ["\U0001f426", "b"], "test": ["c", "d"]})  # ensure_ascii: "\ud83d\udc26"
    assert "\\ud83d\\udc26" in text
    split.write_text(text)  # JSON is YAML too: the same text as .yaml
    records = Folder(root, split=str(split)).load("train")
    assert len(records) == 4 and {Path(p).parent.name for p in records.paths} == {"\U0001f426", "b"}


def test_numpy_object_arrays_are_never_unpickled(tmp_path):
    """The feature cache and every .npz this project reads use allow_pickle=False (docs/security.md)."""
    from ddtas_lightning.config.validation import ConfigError
    from ddtas_lightning.runtime.safe_load import load_npz

    marker = tmp_path / "marker"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(str(marker))
    np.savez(tmp_path / "evil.npz", features=evil)
    with pytest.raises(ConfigError, match="holds object arrays"):
        load_npz(tmp_path / "evil.npz", what="x")
    assert not marker.exists()
    assert os.path.exists(tmp_path / "evil.npz")


class _Payload:
    """Unpickling it opens (creates) ``marker``: what a hostile file would do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---- the feature cache: truncated, short-labelled, NaN-valued; a full disk while writing ----------------
def feature_cache(tmp_path: Path, *, n: int = 10, labels: int | None = None, nan: bool = False,
                  truncate: bool = False):
    """A CachedFeatures source whose cache file is already in place (as a previous run left it)."""
    from ddtas_lightning.data.cached_features import FEATURES, CachedFeatures

    src = CachedFeatures(str(tmp_path / "cache"), images={"name": "tiny", "source": {}}, backbone={},
                         transform={}, standardize=False)
    path = src.cache_dir / FEATURES
    path.parent.mkdir(parents=True)
    features = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    if nan:
        features[3, 1] = np.nan
    np.savez(path, features=features, labels=np.arange(labels if labels is not None else n) % 2,
             split=(np.arange(n) >= n // 2).astype(np.int8))
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return src, path


@pytest.mark.parametrize("kind, message", [
    (dict(truncate=True), r"not a readable feature cache \(feature cache: cannot read .*BadZipFile"),
    (dict(labels=9), r"not a usable feature cache: 10 feature rows but labels of shape \(9,\)"),
    (dict(nan=True), r"not a usable feature cache: 1 of 10 feature rows hold NaN or infinite values"),
], ids=["truncated", "short-labels", "nan"])
def test_bad_feature_cache_is_one_error_naming_the_file(tmp_path, kind, message):
    src, path = feature_cache(tmp_path, **kind)
    with pytest.raises(DatasetLayoutError, match=rf"{path}: {message}.*Delete its directory"):
        src.load("train")


def test_feature_cache_full_disk_leaves_no_tmp_file(tmp_path, monkeypatch):
    import errno

    from ddtas_lightning.data import cached_features as cf

    real = np.savez

    def savez_then_full(file, **arrays):  # the disk fills up after part of the file was written
        real(file, **arrays)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cf.np, "savez", savez_then_full)
    out = tmp_path / "c" / cf.FEATURES
    out.parent.mkdir()
    with pytest.raises(DatasetLayoutError, match=rf"cannot write the feature cache {out}: No space left on device "
                                                 r"\(ENOSPC\); nothing was kept"):
        cf.write_cache(out, out.parent / cf.MANIFEST, {}, np.zeros((2, 3), np.float32), np.zeros(2), np.zeros(2))
    assert list(out.parent.iterdir()) == []


def test_synthetic_data_dir_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from ddtas_lightning.data import synthetic

    def write_then_full(params, out, num_workers):
        (out / "images").mkdir(parents=True)
        (out / "images" / "half.png").write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(synthetic, "write_tree", write_then_full)
    with pytest.raises(DatasetLayoutError, match=rf"cannot write the synthetic dataset in {tmp_path / 'syn'}: No "
                                                 r"space left on device \(ENOSPC\); nothing was kept"):
        synthetic.Synthetic(tmp_path / "syn", num_classes=4, images_per_class=2).load("train")
    assert list((tmp_path / "syn").iterdir()) == []
