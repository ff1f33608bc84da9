"""Which frozen features does cached-feature mode cache? Test R@1 of the raw (un-trained) features of a
random-init backbone, per pooling choice, on the embedded image sets (the figures quoted in
data/cached_features.py, conf/dataset/cached_features.yaml and conf/dataset/glyphs_plain.yaml).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_probe.py [--datasets synthetic glyphs glyphs_plain]

Each (dataset, stages) is one CachedFeatures cache under a temporary root (standardize off, so the figure is
of the features as cached); R@1 by the project's own retrieval metric on the test classes, cosine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from ddtas_lightning.metrics.retrieval import compute_retrieval_metrics

STAGES = {"final avg (stages=null)": None, "stage 1 avg+max": [1], "stages 1-4 avg+max (default)": [1, 2, 3, 4]}


def raw_r1(dataset: str, stages, root: str) -> float:
    overrides = ["experiment=threshold_study", f"dataset@dataset.source.images={dataset}",
                 f"dataset.source.root={root}", "dataset.source.standardize=false",
                 f"dataset.source.stages={'null' if stages is None else stages}", "dataset.source.dim=null"]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    source = instantiate(cfg.dataset.source)
    test = source.make_dataset(source.load("test"))
    metrics = compute_retrieval_metrics(test.vectors, test.labels, recall_ks=[1], map_at_r=False,
                                        r_precision=False, nmi=False)
    return 100 * metrics["R@1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "glyphs", "glyphs_plain"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'dataset':<14} {'features':<30} {'test R@1 %':>10} {'s':>6}")
    with tempfile.TemporaryDirectory() as root:
        for dataset in args.datasets:
            for name, stages in STAGES.items():
                t0 = time.perf_counter()
                r1 = raw_r1(dataset, stages, root)
                print(f"{dataset:<14} {name:<30} {r1:>10.1f} {time.perf_counter() - t0:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
