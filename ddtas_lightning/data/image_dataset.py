"""Records -> tensors: a torch ``Dataset`` over :class:`SplitRecords`, plus the layout checks loaders share.

Bad images (missing, unreadable, truncated, not an image) are handled by ``on_bad_image``:

- ``"fail"`` (default): raise :class:`DatasetLayoutError` naming the file and what was expected. The
  error is raised ``from None`` so that, inside a DataLoader worker, the re-raised exception in the
  main process is a ``DatasetLayoutError`` whose traceback shows our frame and message only (no chained
  PIL traceback).
- ``"skip"``: serve a substitute, the first readable image of the *same class* found by walking the
  class's images cyclically from the bad one (deterministic: the substitute does not depend on which
  worker found the bad file first). The returned label and index are the requested ones, so P x K
  batches and evaluation bookkeeping are unchanged. Every bad file is recorded once in a
  shared-memory mask, so :attr:`ImageDataset.num_skipped` counts distinct bad files found by *any*
  DataLoader worker; :meth:`ImageDataset.verify` finds them all up front, for a count at set-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.data.records import DatasetLayoutError, SplitRecords

log = logging.getLogger(__name__)

BAD_IMAGE_MODES = ("fail", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


WHITE = (255, 255, 255)
BACKGROUND_NAMES = {"white": WHITE, "black": (0, 0, 0), "grey": (128, 128, 128), "gray": (128, 128, 128)}


def parse_background(value, key: str = "dataset.source.background") -> tuple[int, int, int] | None:
    """The colour transparent pixels are composited onto: ``white`` / ``black`` / ``grey``, ``"#rrggbb"``,
    a grey level 0-255 or ``[r, g, b]``; ``None`` (YAML ``null``) drops the alpha channel instead (what
    every image got before this option: transparent pixels show whatever colour they store, often black)."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in BACKGROUND_NAMES:
            return BACKGROUND_NAMES[v]
        if len(v) == 7 and v[0] == "#":
            try:
                return (int(v[1:3], 16), int(v[3:5], 16), int(v[5:7], 16))
            except ValueError:
                pass
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return (value, value, value)
    elif not isinstance(value, bool | float) and hasattr(value, "__iter__"):
        rgb = list(value)
        if len(rgb) == 3 and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb):
            return (rgb[0], rgb[1], rgb[2])
    raise ConfigError(f"{key} must be white, black, grey, '#rrggbb', a grey level 0-255, [r, g, b] with "
                      f"values 0-255, or null (drop the alpha channel), got {value!r}")


def open_rgb(path: str | os.PathLike, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Open an image file fully decoded and converted to 8-bit RGB by :func:`to_rgb8`, transparency
    composited onto ``background`` (raises on missing, corrupt or truncated files)."""
    with Image.open(path) as im:
        im.load()
        return to_rgb8(im, background)


# Integer modes wider than 8 bits: PIL's convert("RGB") clips them to 255 (a 16-bit PNG came out 99.6%
# white), so they are scaled to 0..255 from the full range of their bit depth instead.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def has_alpha(im: Image.Image) -> bool:
    """An alpha channel (RGBA, LA, PA, RGBa, La) or a transparent palette entry / colour key (tRNS)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in im.info and im.mode in ("P", "L", "RGB", "1"))


def composite(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``im`` over an opaque ``background``: ``round(c * a / 255 + b * (1 - a / 255))`` per channel, in float
    arithmetic (red at alpha 128 over white: (255, 127, 127); PIL's own integer compositing rounds otherwise)."""
    import numpy as np

    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    a = rgba[..., 3:4] / np.float32(255.0)
    out = rgba[..., :3] * a + np.asarray(background, dtype=np.float32) * (np.float32(1.0) - a)
    return Image.fromarray(np.rint(out).astype(np.uint8), "RGB")


def to_rgb8(im: Image.Image, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, transparency composited onto ``background`` (see :func:`has_alpha`;
    ``None`` drops the alpha channel instead), scaling rather than clipping wider modes:

    - ``I;16*`` (16-bit grey) and ``I`` (32-bit integer; what 16-bit PNGs and TIFFs decode to) are read as
      0..65535 (clipped there) and mapped with ``round(v * 255 / 65535)``;
    - ``F`` (32-bit float) is read as 0..1 when every value lies in [0, 1], else as 0..255 (clipped);
      NaN becomes 0;
    - ``CMYK``: ``R = 255 (1 - C/255)(1 - K/255)`` (likewise G with M, B with Y);
    - ``RGBA``, ``LA``, ``PA``, palette images with a transparent entry and ``L`` / ``RGB`` with a
      transparent colour key: composited (:func:`composite`); with ``background=None`` the alpha is
      dropped (palette images with transparency go through RGBA);
      other 8-bit modes (``1``, ``L``, ``P``, ``YCbCr``, ``LAB``, ``HSV``, ...) use PIL's conversion.
    """
    import numpy as np

    mode = im.mode
    if background is not None and has_alpha(im):
        return composite(im, background)
    if mode == "RGB":
        return im
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        v = np.asarray(im, dtype=np.float64)
        grey = np.rint(np.clip(v, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        scale = 255.0 if v.size and v.min() >= 0.0 and v.max() <= 1.0 else 1.0
        grey = np.rint(np.clip(v * scale, 0, 255)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "CMYK":
        c, m, y, k = (np.asarray(im, dtype=np.float64)[..., i] / 255.0 for i in range(4))
        rgb = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1)
        return Image.fromarray(np.rint(rgb * 255.0).astype(np.uint8))
    if mode in ("P", "PA") and ("transparency" in im.info or mode == "PA"):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _default_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [0, 1] (used when no transform is given)."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float().div_(255.0)


class ImageDataset(Dataset):
    """``dataset[i] -> (image_tensor, label, i)`` over the images of one split.

    Args:
        records: the split (paths, raw class ids, optional query/gallery flags).
        transform: PIL RGB image -> tensor; ``None`` gives a float (3, H, W) tensor in [0, 1].
        on_bad_image: ``"fail"`` or ``"skip"`` (see the module docstring).
        background: RGB colour that transparent pixels are composited onto (white); ``None`` drops alpha.

    Attributes:
        paths: list of image paths. labels: LongTensor of raw class ids.
        is_query / is_gallery: bool tensors (all True when the split has no separate roles).
    """

    def __init__(
        self,
        records: SplitRecords,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        on_bad_image: str = "fail",
        background: tuple[int, int, int] | None = WHITE,
    ) -> None:
        check_choice("on_bad_image", on_bad_image, BAD_IMAGE_MODES)
        self.background = background
        self.records = records
        self.paths = list(records.paths)
        self.labels = torch.as_tensor(list(records.labels), dtype=torch.long)
        self.is_query, self.is_gallery = records.query_gallery()
        self.transform = transform
        self.on_bad_image = on_bad_image
        # One flag per item, in shared memory so that flags set in DataLoader workers are seen here.
        self._bad = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        # For "skip": the items of each class in dataset order, and each item's position in its class.
        self._class_items: dict[int, list[int]] = {}
        self._pos_in_class: list[int] = []
        for i, y in enumerate(self.labels.tolist()):
            items = self._class_items.setdefault(y, [])
            self._pos_in_class.append(len(items))
            items.append(i)

    def __len__(self) -> int:
        return len(self.paths)

    # --- bad images ---------------------------------------------------------------------------------
    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable images found so far (by :meth:`verify` or any loader worker)."""
        return int(self._bad.sum())

    @property
    def skipped_paths(self) -> list[Path]:
        return [Path(self.paths[i]) for i in self._bad.nonzero().flatten().tolist()]

    def _error(self, i: int, reason: str) -> DatasetLayoutError:
        return DatasetLayoutError(
            f"cannot read image {self.paths[i]} (item {i}, class {int(self.labels[i])}): {reason}. "
            "Expected an existing, readable image file (any format PIL opens, converted to RGB); "
            "re-extract the dataset or set data.on_bad_image=skip to substitute another image of the "
            "same class"
        )

    def _try_open(self, i: int) -> tuple[Image.Image | None, str]:
        try:
            return open_rgb(self.paths[i], self.background), ""
        except FileNotFoundError:
            return None, "file not found"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"{type(e).__name__}: {e}"

    def _mark_bad(self, i: int, reason: str) -> None:
        if not bool(self._bad[i]):
            self._bad[i] = True
            log.warning("skipping unreadable image %s (%s); substituting an image of the same class",
                        self.paths[i], reason)

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of item ``i``, or (``"skip"``) of its substitute; raises per ``on_bad_image``."""
        known_bad = self.on_bad_image == "skip" and bool(self._bad[i])
        image, reason = (None, "") if known_bad else self._try_open(i)
        if image is not None:
            return image
        if self.on_bad_image == "fail":
            raise self._error(i, reason) from None
        if reason:
            self._mark_bad(i, reason)
        items = self._class_items[int(self.labels[i])]
        start = self._pos_in_class[i]
        for step in range(1, len(items)):
            j = items[(start + step) % len(items)]
            if bool(self._bad[j]):
                continue
            image, why = self._try_open(j)
            if image is not None:
                return image
            self._mark_bad(j, why)
        raise DatasetLayoutError(
            f"cannot read image {self.paths[i]} ({reason or 'unreadable'}) and no image of its class "
            f"{int(self.labels[i])} is readable ({len(items)} listed, e.g. {self.paths[items[0]]}); "
            "expected at least one readable image per class"
        ) from None

    def verify(self, num_threads: int = 8) -> list[Path]:
        """Decode every image once; return the unreadable ones (also recorded for ``num_skipped``).

        With ``on_bad_image="fail"`` a non-empty result raises one :class:`DatasetLayoutError` listing
        them; with ``"skip"`` they are logged as one warning with the count, and classes with no readable
        image raise.
        """

        def check(i: int) -> tuple[int, str]:
            return i, self._try_open(i)[1]

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            bad = [(i, why) for i, why in pool.map(check, range(len(self))) if why]
        for i, _ in bad:
            self._bad[i] = True
        if bad and self.on_bad_image == "fail":
            shown = "; ".join(f"{self.paths[i]} ({why})" for i, why in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DatasetLayoutError(
                f"{len(bad)} of {len(self)} images are unreadable: {shown}{more}. Expected readable image "
                "files; re-extract the dataset or set data.on_bad_image=skip"
            )
        if bad:
            log.warning("%d of %d images are unreadable and will be substituted by images of the same "
                        "class, e.g. %s", len(bad), len(self), self.paths[bad[0][0]])
            for y, items in self._class_items.items():
                if all(bool(self._bad[j]) for j in items):
                    raise DatasetLayoutError(
                        f"no image of class {y} is readable ({len(items)} listed, e.g. "
                        f"{self.paths[items[0]]}); expected at least one readable image per class"
                    )
        return [Path(self.paths[i]) for i, _ in bad]

    # --- Dataset protocol ---------------------------------------------------------------------------
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        image = self.load_image(i)
        x = self.transform(image) if self.transform is not None else _default_to_tensor(image)
        return x, int(self.labels[i]), i

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {len(self._class_items)} classes, "
                f"on_bad_image={self.on_bad_image!r})")


# --- Layout checks shared by the loaders -------------------------------------------------------------
def require_file(path: Path, layout: str) -> Path:
    """``path`` must be an existing file, else one DatasetLayoutError naming it and the expected layout."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "is missing"
        raise DatasetLayoutError(f"{path} {what}; expected layout: {layout}")
    return path


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "is missing"
        raise DatasetLayoutError(f"{path} {what}; expected layout: {layout}")
    return path


def read_lines(path: Path, layout: str) -> list[str]:
    """Non-blank lines of a text file (UTF-8, stripped), checking it exists."""
    require_file(path, layout)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetLayoutError(f"cannot read {path}: {e}; expected a UTF-8 text file ({layout})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_images_exist(paths: Sequence[Path], listed_in: str | Path, layout: str) -> None:
    """Every listed image must exist (one stat per file); one error naming the first missing ones."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DatasetLayoutError(
            f"{len(missing)} of {len(paths)} images listed in {listed_in} are missing: {shown}{more}; "
            f"expected layout: {layout}"
        )


def split_classes(class_ids: Iterable[int], train_classes: int | Sequence[int] | None,
                  where: str) -> set[int]:
    """The train class ids of a class-disjoint split over sorted ``class_ids``.

    ``None``: the first half (e.g. CUB 1-100 of 200, Cars 1-98 of 196); an int N: the first N;
    a sequence: exactly those ids (each must exist). Both sides must be non-empty.
    """
    ids = sorted(set(class_ids))
    if train_classes is None:
        chosen = set(ids[: len(ids) // 2])
    elif isinstance(train_classes, int) and not isinstance(train_classes, bool):
        if not 0 < train_classes < len(ids):
            raise ConfigError(f"dataset.source.train_classes={train_classes} must be between 1 and "
                              f"{len(ids) - 1} ({len(ids)} classes in {where})")
        chosen = set(ids[:train_classes])
    else:
        chosen = {int(c) for c in train_classes}
        unknown = sorted(chosen - set(ids))
        if unknown:
            raise DatasetLayoutError(f"train_classes names class ids {unknown[:5]} not present in {where}")
    if not chosen or len(chosen) == len(ids):
        raise DatasetLayoutError(f"the class split of {where} leaves no train or no test class "
                                 f"({len(ids)} classes, {len(chosen)} train)")
    return chosen


def warn_if_counts_differ(name: str, expected: dict, actual: dict, full_size: bool) -> None:
    """Log a warning when a full-size tree's counts differ from the published ones."""
    if not full_size:
        return
    diff = {k: (actual.get(k), v) for k, v in expected.items() if k in actual and actual[k] != v}
    if diff:
        shown = ", ".join(f"{k}: {a} (expected {e})" for k, (a, e) in diff.items())
        log.warning("%s: the tree looks like the full dataset but its counts differ from the published "
                    "ones: %s. Results will not be comparable with the papers'.", name, shown)
