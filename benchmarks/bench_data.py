"""Images per second through the image pipeline at 227 px, against the raw JPEG decode rate.

The benchmark writes its own JPEGs into a temporary directory: ``--images`` files of CUB-200's typical
size (500 x 375, quality 90, smooth random content plus grain, ~30-60 KB each, as photographs).
Rows:
  decode     one process, one thread, images/s of the decode alone: PIL (``open_rgb``, what the
             datasets call), PIL with JPEG draft mode (DCT-domain downscale to >= the resize side; pays
             only for images at least twice the resize side, so CUB-size images decode at full size),
             ``torchvision.io.decode_jpeg`` on CPU, and ``decode_jpeg(device="cuda")`` on a batch of
             files ("no CUDA device: skipped" without one).
  transform  decoded PIL image -> tensor through each transform's train and test callable
             (``bninception``, ``imagenet``, ``timm`` = timm's resnet50 preprocessing at 227 px).
  loader     the real pipeline: ``ImageDataset`` (decode + train transform) in a ``DataLoader`` of
             batch 32 with 0, 1 and 2 workers (persistent, prefetch 2), images/s over the batches after
             the first (start-up shown separately), as the training loop consumes them.
Threads: torch and PIL run one thread per process (workers too), as on a loaded machine; with 2
cores shared by other processes, absolute rates move with the load, the ratios between rows less.

Run: .venv/bin/python benchmarks/bench_data.py [--images 96] [--batches 4] [--quick] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddtas_lightning.data.image_dataset import ImageDataset, open_rgb  # noqa: E402
from ddtas_lightning.data.records import SplitRecords  # noqa: E402
from ddtas_lightning.data.transforms import BNInceptionTransform, ImageNetTransform, TimmTransform  # noqa: E402

SKIPPED = "no CUDA device: skipped"
CUB_SIZE = (500, 375)


def write_jpegs(root: Path, n: int, size: tuple[int, int] = CUB_SIZE, quality: int = 90, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of ``size`` with photograph-like statistics: a smooth random field (bilinear
    upsampling of coarse noise) plus fine grain."""
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
        grain = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        path = root / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def rate(fn, items, repeats: int = 3) -> float:
    """Items per second of ``fn`` over ``items`` (best of ``repeats`` passes: the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def draft_decode(path: Path, side: int = 256) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (side, side))
        return im.convert("RGB")


def decode_rows(paths: list[Path], repeats: int) -> list[tuple[str, str]]:
    from torchvision.io import decode_jpeg, read_file

    rows = [
        ("decode: PIL open_rgb", f"{rate(open_rgb, paths, repeats):8.1f}"),
        ("decode: PIL draft >= 256", f"{rate(draft_decode, paths, repeats):8.1f}"),
        ("decode: torchvision CPU", f"{rate(lambda p: decode_jpeg(read_file(str(p))), paths, repeats):8.1f}"),
    ]
    if torch.cuda.is_available():
        data = [read_file(str(p)) for p in paths]
        decode_jpeg(data[:2], device="cuda")  # initialise nvjpeg
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode_jpeg(data, device="cuda")
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rows.append(("decode: torchvision CUDA", f"{len(data) / best:8.1f}"))
    else:
        rows.append(("decode: torchvision CUDA", SKIPPED))
    return rows


def transforms(size: int) -> dict:
    return {
        "bninception": BNInceptionTransform(image_size=size),
        "imagenet": ImageNetTransform(image_size=size),
        "timm": TimmTransform("resnet50", image_size=size, train_kwargs={"scale": (0.16, 1.0)}),
    }


def loader_rate(dataset, workers: int, batches: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch) of a fresh DataLoader."""
    kwargs = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0),
                                         worker_init_fn=_one_thread, **kwargs)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t1, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            x, _, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t1), first


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="JPEGs written (and decoded per decode pass)")
    parser.add_argument("--batches", type=int, default=4, help="timed batches of 32 per loader row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="48 images, 2 batches, 1 repeat, workers 0,2")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batches, args.repeats, args.workers = 48, 2, 1, "0,2"
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        kib = statistics.mean(p.stat().st_size for p in paths) / 1024
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{len(paths)} JPEGs {CUB_SIZE[0]}x{CUB_SIZE[1]} (mean {kib:.0f} KiB) -> {args.size} px; "
              f"cpus {os.cpu_count()}, load {load:.1f}, torch {torch.__version__}; images/s")
        rows = decode_rows(paths, args.repeats)
        images = [open_rgb(p) for p in paths]
        records = SplitRecords(paths=list(paths), labels=[i % 8 for i in range(len(paths))])
        for name, tf in transforms(args.size).items():
            rows.append((f"transform: {name} train", f"{rate(tf.train, images, args.repeats):8.1f}"))
            rows.append((f"transform: {name} test", f"{rate(tf.test, images, args.repeats):8.1f}"))
            dataset = ImageDataset(records, transform=tf.train)
            for w in workers:
                ips, first = loader_rate(dataset, w, args.batches)
                rows.append((f"loader: {name} train, {w} workers", f"{ips:8.1f}   (first batch {first:.2f} s)"))
    width = max(len(r[0]) for r in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
