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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddtas_lightning.data.gaussian_clusters import VectorDataset
from ddtas_lightning.data.records import DatasetLayoutError, DatasetSource, SplitRecords

log = logging.getLogger(__name__)
FEATURES, MANIFEST = "features.npz", "manifest.json"
SPLIT_CODES = {"train": 0, "test": 1}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


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
        standardize: z-score features with train-split statistics at load time.
        dim: the expected feature size (a check: ``backbone.in_dim`` of the head must match it).
        batch_size, device: of the one embedding pass (``device``: cpu | cuda | auto).
    """

    def __init__(self, root: str, images, backbone, transform, backbone_seed: int = 0, stages=None,
                 standardize: bool = True, dim: int | None = None, batch_size: int = 256, device: str = "auto") -> None:
        self.root = Path(root)
        self.images, self.backbone, self.transform = _plain(images), _plain(backbone), _plain(transform)
        self.backbone_seed, self.standardize = int(backbone_seed), bool(standardize)
        self.stages = None if stages is None else [int(i) for i in stages]
        self.dim, self.batch_size, self.device = dim, int(batch_size), device
        self._arrays: dict[str, np.ndarray] | None = None

    def manifest(self) -> dict:
        return {"images": self.images, "backbone": self.backbone, "transform": self.transform,
                "backbone_seed": self.backbone_seed, "stages": self.stages}

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
        out.parent.mkdir(parents=True, exist_ok=True)
        features, labels, split = self._embed_all()
        tmp = out.with_name(f".{FEATURES}.{os.getpid()}.tmp.npz")
        np.savez(tmp, features=features, labels=labels, split=split)
        (self.cache_dir / MANIFEST).write_text(json.dumps(self.manifest(), indent=1, default=str) + "\n")
        os.replace(tmp, out)
        log.info("cached %d features of dim %d in %s", len(labels), features.shape[1], out)
        return out

    @torch.no_grad()
    def _embed_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ddtas_lightning.data.image_dataset import ImageDataset

        source = instantiate(self.images["source"])
        if hasattr(source, "materialise"):
            source.materialise()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.backbone_seed)
            model = instantiate(self.backbone)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        model = model.to(device).eval()
        test_tf = instantiate(self.transform).test
        chunks, labels, split = [], [], []
        for name, code in SPLIT_CODES.items():
            records = source.load(name)
            loader = torch.utils.data.DataLoader(ImageDataset(records, test_tf), batch_size=self.batch_size)
            for x, y, _ in loader:
                chunks.append(self._features(model, x.to(device)).float().cpu())
                labels.append(y)
                split.append(torch.full_like(y, code))
        return (torch.cat(chunks).numpy(), torch.cat(labels).numpy().astype(np.int64),
                torch.cat(split).numpy().astype(np.int8))

    def _features(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.stages is None:
            return model.pool(model.backbone.forward_features(x))
        maps = model.backbone.forward_intermediates(x, indices=self.stages, intermediates_only=True)
        return torch.cat([torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1) for f in maps], 1)

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            path = self.materialise()
            try:
                with np.load(path) as z:
                    arrays = {k: z[k] for k in ("features", "labels", "split")}
            except (OSError, KeyError, ValueError) as e:
                raise DatasetLayoutError(
                    f"{path}: not a readable feature cache ({type(e).__name__}: {e}); expected a .npz with "
                    "features (N, D) float32, labels (N,) int and split (N,) 0 train / 1 test. Delete its "
                    "directory to rebuild it") from None
            if self.dim is not None and arrays["features"].shape[1] != int(self.dim):
                raise DatasetLayoutError(
                    f"{path}: features have dim {arrays['features'].shape[1]}, but dataset.source.dim="
                    f"{self.dim} (set it, and backbone.in_dim, to the backbone's feature size)")
            if self.standardize:
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

    def make_dataset(self, records: SplitRecords, transform=None) -> VectorDataset:
        """The vectors of ``records`` (any subset of this source's records, e.g. a class-disjoint split)."""
        idx = torch.tensor([int(Path(p).name) for p in records.paths], dtype=torch.long)
        return VectorDataset(torch.from_numpy(self.arrays()["features"])[idx], records.labels, records.paths,
                             transform)


__all__ = ["CachedFeatures"]


def main(argv: list[str] | None = None) -> int:
    """``python -m ddtas_lightning.data.cached_features [override ...]``: write the feature cache of
    ``experiment=threshold_study`` (plus the overrides, e.g. ``dataset@dataset.source.images=glyphs``) once,
    before parallel sweeps would each build it; prints its path."""
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    overrides = list(sys.argv[1:] if argv is None else argv)
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
