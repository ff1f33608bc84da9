"""Cached-feature mode: a frozen backbone embeds an image dataset once; heads then train on the vectors.

Many-seed studies cannot afford a backbone forward per step on a CPU. Here every image of a dataset
source (``images``: any dataset config, e.g. synthetic or glyphs) goes once through a frozen backbone
(``backbone``: an Embedder config, random init unless ``pretrained`` / ``checkpoint_path`` say otherwise)
with the dataset's test-time transform; the pooled features (before the head) are written to

    <root>/<fingerprint>/features.npz   features (N, D) float32, labels (N,), split (N,) 0 train / 1 test
    <root>/<fingerprint>/manifest.json  the image-dataset, backbone and transform configs that made it

The fingerprint hashes that manifest, so a changed knob makes a new cache and an unchanged one is reused
by every run and seed (the backbone's weights are drawn from ``backbone_seed``, not the run's seed: one
frozen backbone for the whole study). Train on it with ``backbone=mlp`` (``backbone.in_dim`` = the feature
size) and ``transform=none``; the data module splits validation and meta classes off the train classes
as for images. ``standardize`` z-scores each feature with the train split's mean and std (random-init
features have arbitrary scales per channel; the statistics come from train images only).

Partial fine-tuning (``train_from_stage=k``): instead of pooled features, the cache holds the activations
(N, C, H, W) entering stage k of the backbone (stage numbering: ddtas_lightning/models/stage_tail.py), float16
by default (``dtype``), and ``backbone=stage_tail`` trains stages k.. of the same model, initialised from the
same weights, on them. The frozen stages run once; the trained tail runs every step. Only the test-time
transform is cached: train-time augmentation (random crops, flips) is lost in both modes.

The pass prints its progress to stderr (images done / total, images/s, every ``progress_every`` seconds).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.data.gaussian_clusters import RowDataset, VectorDataset
from ddtas_lightning.data.records import DatasetLayoutError, DatasetSource, SplitRecords

log = logging.getLogger(__name__)
FEATURES, MANIFEST = "features.npz", "manifest.json"
SPLIT_CODES = {"train": 0, "test": 1}
DTYPES = ("float32", "float16")


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def check_stage_list(stages) -> list[int]:
    """``dataset.source.stages``: a non-empty list of distinct integer stage indices >= 0."""
    items = list(stages) if isinstance(stages, list | tuple) or OmegaConf.is_list(stages) else None
    ok = bool(items) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)
    if not ok or len(set(items)) != len(items):
        raise ConfigError(f"dataset.source.stages must be null or a non-empty list of distinct stage indices >= 0 "
                          f"(e.g. [1, 2, 3, 4] for a resnet's layers), got {stages!r}")
    return [int(i) for i in items]


def check_stage_indices(backbone: torch.nn.Module, stages: list[int], model_name: str = "") -> None:
    """``dataset.source.stages`` inside the backbone's stages (0 stem .. last), before any image is read; a
    family :mod:`ddtas_lightning.models.stage_tail` does not know is left to timm's own check."""
    from ddtas_lightning.models.stage_tail import stage_modules

    try:
        last = len(stage_modules(backbone)) - 1
    except ConfigError:
        return
    bad = [i for i in stages if i > last]
    if bad:
        raise ConfigError(f"dataset.source.stages={stages}: {model_name or type(backbone).__name__} has stages 0 "
                          f"(stem) to {last}, so {bad} {'is' if len(bad) == 1 else 'are'} not one of them; use "
                          f"indices in 0..{last} (e.g. [1, 2, 3, 4] for a resnet's layers)")


class CachedFeatures(DatasetSource):
    """Features of ``images`` through a frozen ``backbone`` (module docstring for the layout).

    Args:
        root: where caches live (one sub-directory per fingerprint).
        images: the image dataset's config node (its ``source`` is instantiated to list the images).
        backbone: an Embedder config (the head is unused; the pooled features are cached).
        transform: a TransformPair config; its ``test`` half preprocesses every image (no augmentation).
        backbone_seed: torch seed for the backbone's random initialisation.
        stages: null = the backbone's pooled final features (its own ``pooling``) | a list of stage
            indices of timm's ``forward_intermediates`` (resnet: 0 stem, 1-4 layers), each pooled by
            average and max, concatenated: a random-init network's early stages carry most of its
            retrieval signal (resnet18 on the synthetic set, raw-feature test R@1: final avg 13.4, stage 1
            avg+max 46.1, stages 1-4 avg+max 42.0; ``benchmarks/feature_probe.py``).
        train_from_stage: null = pooled features (above) | k: cache the activations entering stage k (the input
            of the first trained stage of ``backbone=stage_tail``); excludes ``stages``.
        standardize: z-score features with train-split statistics at load time (null: true for pooled
            features, false for activations, where it must stay false: the tail expects raw activations).
        dim: the expected feature size (a check: ``backbone.in_dim`` of the head must match it); with
            ``train_from_stage``, the activations' channels (null: unchecked).
        dtype: float32 | float16 storage (null: float16 for activations, float32 for pooled features).
        batch_size, device: of the one embedding pass (``device``: cpu | cuda | auto). On a CPU small batches
            are the faster (tf_efficientnet_lite0 at 224 px: 16 ~1.7x the images/s of 128; the activations
            stay in cache; ``benchmarks/bench_feature_cache.py``); on a GPU use a few hundred.
        num_workers: DataLoader worker processes decoding and transforming images beside the model (0: in
            the main process).
        channels_last: run the pass in channels-last memory format (faster for the depthwise convs of
            EfficientNets on a CPU; identical values up to float rounding).
        fold_bn: fold each eval-mode BatchNorm that directly follows a convolution into that convolution's
            weights for the pass (checked on the first images against the unfolded model; kept only if equal
            up to float rounding). Values equal up to float rounding.
        progress_every: seconds between progress lines on stderr (0: every batch; null: none).
    """

    def __init__(self, root: str, images, backbone, transform, backbone_seed: int = 0, stages=None,
                 standardize: bool | None = True, dim: int | None = None, batch_size: int = 16,
                 device: str = "auto", train_from_stage: int | None = None, dtype: str | None = None,
                 num_workers: int = 0,
                 channels_last: bool = True, fold_bn: bool = True, progress_every: float | None = 10.0) -> None:
        self.root = Path(root)
        self.images, self.backbone, self.transform = _plain(images), _plain(backbone), _plain(transform)
        self.backbone_seed = int(backbone_seed)
        self.stages = None if stages is None else check_stage_list(stages)
        if train_from_stage is not None:
            if isinstance(train_from_stage, bool) or not isinstance(train_from_stage, int):
                raise ConfigError(f"dataset.source.train_from_stage must be null or an integer stage index, got "
                                  f"{train_from_stage!r}")
            if self.stages is not None:
                raise ConfigError("dataset.source.train_from_stage (cached activations) and dataset.source.stages "
                                  "(pooled stage features) exclude each other; set dataset.source.stages=null")
            if standardize:
                raise ConfigError("dataset.source.standardize=true with train_from_stage: the stage tail expects "
                                  "the raw activations; set dataset.source.standardize=null or false")
        self.train_from_stage = train_from_stage
        self.standardize = train_from_stage is None if standardize is None else bool(standardize)
        dtype = dtype or ("float16" if train_from_stage is not None else "float32")
        check_choice("dataset.source.dtype", dtype, DTYPES)
        self.dtype = dtype
        self.dim, self.batch_size, self.device = dim, int(batch_size), device
        self.num_workers = int(num_workers)
        self.channels_last, self.fold_bn = bool(channels_last), bool(fold_bn)
        self.progress_every = None if progress_every is None else float(progress_every)
        self._arrays: dict[str, np.ndarray] | None = None

    def manifest(self) -> dict:
        out = {"images": self.images, "backbone": self.backbone, "transform": self.transform,
               "backbone_seed": self.backbone_seed, "stages": self.stages}
        if self.train_from_stage is not None or self.dtype != "float32":  # (older caches keep their key)
            out.update(train_from_stage=self.train_from_stage, dtype=self.dtype)
        return out

    @property
    def cache_dir(self) -> Path:
        blob = json.dumps(self.manifest(), sort_keys=True, default=str).encode()
        name = str(self.images.get("name", "images"))
        return self.root / f"{name}-{hashlib.sha256(blob).hexdigest()[:12]}"

    def materialise(self) -> Path:
        """Write the cache unless it exists (atomically: a killed pass leaves no half file)."""
        out = self.cache_dir / FEATURES
        if out.exists():
            return out
        features, labels, split = self._embed_all()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_cache(out, self.cache_dir / MANIFEST, self.manifest(), features, labels, split)
        what = "activations" if self.train_from_stage is not None else "features"
        size = f"{features.nbytes / 2**20:.1f} MiB {features.dtype}"
        log.info("cached %d %s of shape %s (%s) in %s", len(labels), what, tuple(features.shape[1:]), size, out)
        return out

    def model(self) -> torch.nn.Module:
        """The frozen backbone of the pass (an Embedder config, drawn from ``backbone_seed``), eval mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.backbone_seed)
            model = instantiate(self.backbone)
        if self.train_from_stage is not None:
            from ddtas_lightning.models.stage_tail import check_stage

            check_stage(model.backbone, self.train_from_stage, "dataset.source.train_from_stage",
                        self.backbone.get("model_name", ""))
        elif self.stages is not None:
            check_stage_indices(model.backbone, self.stages, self.backbone.get("model_name", ""))
        return model.eval().requires_grad_(False)

    @torch.inference_mode()
    def _embed_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ddtas_lightning.data.image_dataset import ImageDataset

        model = self.model()  # first: a bad stage index stops before the image set is written
        source = instantiate(self.images["source"])
        if hasattr(source, "materialise"):
            source.materialise()
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=memory_format)
        forward = self._forward(model)
        test_tf = instantiate(self.transform).test
        records = {name: source.load(name) for name in SPLIT_CODES}
        progress = _Progress(sum(len(r) for r in records.values()), self.progress_every,
                             "activations" if self.train_from_stage is not None else "features")
        dtype = getattr(torch, self.dtype)
        chunks, labels, split = [], [], []
        for name, code in SPLIT_CODES.items():
            loader = torch.utils.data.DataLoader(ImageDataset(records[name], test_tf), batch_size=self.batch_size,
                                                 num_workers=self.num_workers)
            for x, y, _ in loader:
                x = x.to(device, memory_format=memory_format)
                if self.fold_bn and not chunks:  # first batch: fold, if the folded pass gives the same values
                    model, forward = self._folded(model, forward, x[:2])
                out = forward(x)
                chunks.append(out.to(dtype).cpu().contiguous())
                labels.append(y)
                split.append(torch.full_like(y, code))
                progress.update(len(y))
        features = torch.cat(chunks).numpy()
        progress.done(features.nbytes)
        return features, torch.cat(labels).numpy().astype(np.int64), torch.cat(split).numpy().astype(np.int8)

    def _folded(self, model, forward, probe: torch.Tensor):
        """(model, forward) with BatchNorms folded into their convolutions, or the originals (and a log line)
        when no BatchNorm folds or the folded model's output on ``probe`` differs beyond float rounding."""
        folded = copy.deepcopy(model)
        n = fold_batchnorm_(folded.backbone, probe)
        if n == 0:
            return model, forward
        folded_forward = self._forward(folded)
        want, got = forward(probe).float(), folded_forward(probe).float()
        if torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
            return folded, folded_forward
        log.info("feature cache: BatchNorm folding changed the output of %s; the pass runs unfolded",
                 type(model.backbone).__name__)
        return model, forward

    def _forward(self, model):
        """images -> what the cache holds: activations entering stage k, or pooled (stage) features."""
        if self.train_from_stage is not None:
            from ddtas_lightning.models.stage_tail import frozen_stages

            return frozen_stages(model.backbone, self.train_from_stage)
        return lambda x: self._features(model, x)

    def _features(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.stages is None:
            return model.pool(model.backbone.forward_features(x))
        try:
            maps = model.backbone.forward_intermediates(x, indices=self.stages, intermediates_only=True)
        except (AssertionError, IndexError) as e:  # timm's check of the indices (families check_stage_indices skips)
            raise ConfigError(f"dataset.source.stages={self.stages}: not stage indices of "
                              f"{self.backbone.get('model_name', type(model.backbone).__name__)} "
                              f"({type(e).__name__}: {e}); see timm's forward_intermediates") from None
        return torch.cat([torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1) for f in maps], 1)

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            path = self.materialise()
            arrays = read_cache(path)
            if self.dim is not None and arrays["features"].shape[1] != int(self.dim):
                raise DatasetLayoutError(
                    f"{path}: features have dim {arrays['features'].shape[1]}, but dataset.source.dim="
                    f"{self.dim} (set it, and backbone.in_dim, to the backbone's feature size)")
            if self.standardize:
                arrays["features"] = arrays["features"].astype(np.float32, copy=False)
                train = arrays["features"][arrays["split"] == SPLIT_CODES["train"]]
                mean, std = train.mean(0), train.std(0)
                arrays["features"] = ((arrays["features"] - mean) / np.where(std > 0, std, 1)).astype(np.float32)
            self._arrays = arrays
        return self._arrays

    def load(self, split: str) -> SplitRecords:
        self.check_split(split)
        a = self.arrays()
        idx = np.flatnonzero(a["split"] == SPLIT_CODES[split])
        return SplitRecords([Path("features", str(i)) for i in idx], a["labels"][idx].tolist())

    def make_dataset(self, records: SplitRecords, transform=None) -> VectorDataset | ActivationDataset:
        """The vectors (or activations) of ``records`` (any subset of this source's records, e.g. a class-
        disjoint split)."""
        idx = np.array([int(Path(p).name) for p in records.paths], dtype=np.int64)
        features = self.arrays()["features"]
        if features.ndim > 2:  # activations: a view of the one array, float32 per item
            return ActivationDataset(features, idx, records.labels, records.paths, transform)
        return VectorDataset(torch.from_numpy(features[idx]), records.labels, records.paths, transform)


CACHE_LAYOUT = ("a .npz with features (N, D) or activations (N, C, H, W), finite floats; labels (N,) integers; "
                "split (N,) 0 train / 1 test")


def write_cache(out: Path, manifest_path: Path, manifest: dict, features: np.ndarray, labels: np.ndarray,
                split: np.ndarray) -> None:
    """``features.npz`` and ``manifest.json``, each written to a temporary file and renamed into place; a full
    or read-only disk leaves neither a ``.tmp.npz`` nor a half file, and is one DatasetLayoutError."""
    tmp = out.with_name(f".{FEATURES}.{os.getpid()}.tmp.npz")
    tmp_manifest = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    try:
        np.savez(tmp, features=features, labels=labels, split=split)
        tmp_manifest.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
        os.replace(tmp_manifest, manifest_path)
        os.replace(tmp, out)
    except OSError as e:
        import errno

        code = errno.errorcode.get(e.errno or 0, type(e).__name__)
        raise DatasetLayoutError(
            f"cannot write the feature cache {out}: {e.strerror or e} ({code}); nothing was kept. Free space on (or "
            "make writable) its directory, or set dataset.source.root to another one") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)


def read_cache(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a feature cache, read without pickles and checked: a truncated or foreign file, labels
    or split of another length than the features, split codes other than 0 / 1, or NaN / infinite values
    are one DatasetLayoutError naming the file (and the cure: delete its directory, it is rebuilt)."""
    from ddtas_lightning.config.validation import ConfigError
    from ddtas_lightning.runtime.safe_load import load_npz

    cure = f"expected {CACHE_LAYOUT}. Delete its directory ({path.parent}) to rebuild it"
    try:
        arrays = load_npz(path, what="feature cache", keys=("features", "labels", "split"))
    except ConfigError as e:
        raise DatasetLayoutError(f"{path}: not a readable feature cache ({e}); {cure}") from None
    features, labels, split = arrays["features"], arrays["labels"], arrays["split"]
    n = len(features) if features.ndim else 0
    problem = None
    if features.ndim < 2 or not np.issubdtype(features.dtype, np.floating):
        problem = f"features have shape {features.shape} and dtype {features.dtype}"
    elif labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        problem = f"{n} feature rows but labels of shape {labels.shape} ({labels.dtype})"
    elif split.shape != (n,) or not np.isin(split, list(SPLIT_CODES.values())).all():
        problem = f"{n} feature rows but split of shape {split.shape} with codes {np.unique(split)[:5].tolist()}"
    else:
        bad = sum(int((~np.isfinite(features[i:i + 4096])).any(axis=tuple(range(1, features.ndim))).sum())
                  for i in range(0, n, 4096))
        if bad:
            problem = f"{bad} of {n} feature rows hold NaN or infinite values"
    if problem:
        raise DatasetLayoutError(f"{path}: not a usable feature cache: {problem}; {cure}")
    return arrays


class ActivationDataset(RowDataset):
    """``dataset[i] -> (activation (C, H, W) float32, label, i)`` over rows ``index`` of one (N, C, H, W)
    array, stored as it is (float16: half the memory) and never copied per split. Attributes as
    :class:`VectorDataset` (``labels``, ``paths``, ``is_query``, ``is_gallery``)."""

    noun = "activations"

    def __init__(self, array: np.ndarray, index: np.ndarray, labels, paths, transform=None) -> None:
        self.array, self.index = array, np.asarray(index, dtype=np.int64)
        super().__init__(len(self.index), labels, paths, transform)

    def _row(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[self.index[i]], dtype=np.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} activations of shape {tuple(self.array.shape[1:])})"


def fold_batchnorm_(backbone: torch.nn.Module, probe: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm whose input is a convolution's output into that convolution, in place;
    the BatchNorm is replaced by what follows it inside the module (timm's BatchNormAct2d: its dropout and
    activation; plain BatchNorm2d: nothing). The pairs are found by running ``backbone.forward_features`` on
    ``probe`` with hooks (a BN whose input tensor *is* a conv's output tensor). Returns the number folded.
    The caller checks the outputs: a conv output also used elsewhere (none in timm's CNNs) would differ."""
    from torch import nn

    produced: list[tuple[torch.Tensor, nn.Conv2d]] = []
    pairs: list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]] = []

    def after_conv(module, _args, out):
        produced.append((out, module))

    def before_bn(module, args):
        conv = next((c for t, c in reversed(produced) if t is args[0]), None)
        if conv is not None and not module.training and module.running_var is not None:
            pairs.append((conv, module))

    handles = [m.register_forward_hook(after_conv) for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(before_bn) for m in backbone.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.inference_mode():
            backbone.forward_features(probe)
    finally:
        for h in handles:
            h.remove()
    parents = [(parent, name, child) for parent in backbone.modules() for name, child in parent.named_children()]
    done = set()
    for conv, bn in pairs:
        if id(bn) in done or id(conv) in {id(c) for c, b in pairs if b is not bn}:
            continue  # a BN seen twice, or a conv feeding two BNs: leave them
        done.add(id(bn))
        with torch.no_grad():
            scale = bn.running_var.add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
        tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        replacement = nn.Sequential(*tail) if tail else nn.Identity()
        for parent, name, child in parents:
            if child is bn:
                setattr(parent, name, replacement)
    return len(done)


class _Progress:
    """Progress lines on stderr: images done / total, images/s, time left; a last line with the cache size."""

    def __init__(self, total: int, every: float | None, what: str) -> None:
        self.total, self.every, self.what = total, every, what
        self.done_n, self.start = 0, time.perf_counter()
        self.last = self.start

    def _line(self, text: str) -> None:
        print(f"feature cache: {text}", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done_n += n
        now = time.perf_counter()
        if self.every is None or (now - self.last < self.every and self.done_n < self.total):
            return
        self.last = now
        rate = self.done_n / max(now - self.start, 1e-9)
        left = (self.total - self.done_n) / rate if rate > 0 else float("nan")
        self._line(f"{self.done_n}/{self.total} images ({100 * self.done_n / max(self.total, 1):.0f}%), "
                   f"{rate:.1f} images/s, {left:.0f} s left")

    def done(self, nbytes: int) -> None:
        if self.every is None:
            return
        took = time.perf_counter() - self.start
        self._line(f"{self.done_n} images in {took:.1f} s ({self.done_n / max(took, 1e-9):.1f} images/s), "
                   f"{self.what} {nbytes / 2**20:.1f} MiB")


__all__ = ["ActivationDataset", "CachedFeatures"]


def main(argv: list[str] | None = None) -> int:
    """``python -m ddtas_lightning.data.cached_features [override ...]``: write the feature cache of
    ``experiment=threshold_study`` (plus the overrides, e.g. ``dataset@dataset.source.images=glyphs``) once,
    before parallel sweeps would each build it; prints its path."""
    import inspect
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):  # Hydra's compose() would read it as a bad override
        print("usage: python -m ddtas_lightning.data.cached_features [override ...]\n\n"
              + inspect.cleandoc(main.__doc__.split(":", 1)[1]))
        return 0
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=threshold_study", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # paths.* interpolate hydra:runtime values
    if cfg.dataset.source.get("_target_", "").rsplit(".", 1)[-1] != CachedFeatures.__name__:
        print(f"error: dataset={cfg.dataset.name} is not a cached-feature dataset (dataset=cached_features)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(instantiate(cfg.dataset.source).materialise())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
