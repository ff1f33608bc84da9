"""Summary of the NSPA study: ``python -m ddtas_lightning.nspa_report <multirun dir> [--split test]``.

Reads every ``metrics.json`` under the directory (one per run of ``make nspa``), groups the runs by
their ``miner=`` override (the strategy; none given = the experiment's ``nspa``) and prints, per
strategy, the mean +- sample standard deviation (ddof 1) over the runs (seeds) of R@1, MAP@R and the
NSPA cluster statistics of the chosen split: ``test`` (the trained model on the unseen test classes),
``untrained`` (the same before training) or ``heldout``: the tested checkpoint of each run re-evaluated on
the held-out samples of the *train* classes (gaussian_clusters' ``val`` split), the set the paper's cluster
analysis used (spec docs/papers/nspa.md §2.1, §3.2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

METRICS = (
    ("R@1", "R@1"),
    ("MAP@R", "MAP@R"),
    ("centroid dist", "avgCentroidDistance"),
    ("radius", "avgClusterRadius"),
    ("norm radius", "normClusterRadius"),
    ("neg. in cluster", "avgPctOfNegativesInCluster"),
)
ORDER = ("nspa_hardest", "nspa_random_hard", "nspa_semi_hard", "nspa")


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        run = json.loads(path.read_text())
        overrides = dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o)
        run["strategy"] = overrides.get("miner", "nspa")
        run["dir"] = path.parent
        runs.append(run)
    return runs


def heldout_metrics(run_dir: Path, run: dict) -> dict[str, float]:
    """R@1, MAP@R and the cluster statistics of a run's tested model on its source's ``val`` split."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ddtas_lightning.config.trusted_targets import check_trusted_config
    from ddtas_lightning.config.validation import ConfigError
    from ddtas_lightning.metrics import compute_retrieval_metrics
    from ddtas_lightning.metrics.cluster_stats import cluster_statistics
    from ddtas_lightning.runtime.safe_load import load_torch_file

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    check_trusted_config(cfg, str(run_dir / ".hydra" / "config.yaml"))  # it is instantiated below
    ckpt = Path(run.get("best_checkpoint") or run_dir / "checkpoints" / "last.ckpt")
    loaded = load_torch_file(ckpt, what=f"{run_dir}: heldout", noun="checkpoint",
                             expected="a checkpoint written by ddtas_lightning.train")  # weights only
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        raise ConfigError(f"{run_dir}: heldout: {ckpt} is not a Lightning checkpoint (no 'state_dict' entry)")
    state = loaded["state_dict"]
    model = instantiate(cfg.backbone)
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    source = instantiate(cfg.dataset.source)
    data = source.make_dataset(source.load("val"))
    with torch.no_grad():
        emb = model.eval()(data.vectors)
    out = compute_retrieval_metrics(emb, data.labels, recall_ks=(1,), r_precision=False, nmi=False)
    out.update(cluster_statistics(emb, data.labels))
    return {f"heldout/{k}": float(v) for k, v in out.items()}


def summarise(runs: list[dict], split: str = "test") -> dict[str, dict[str, tuple[float, float, int]]]:
    """strategy -> metric label -> (mean, std, number of runs with that metric)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["strategy"], []).append(run.get(split, {}))
    rank = {name: i for i, name in enumerate(ORDER)}
    out = {}
    for strategy in sorted(groups, key=lambda s: (rank.get(s, len(ORDER)), s)):
        row = {}
        for label, key in METRICS:
            values = [m[f"{split}/{key}"] for m in groups[strategy] if f"{split}/{key}" in m]
            values = [v for v in values if not math.isnan(v)]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            row[label] = (mean, std, len(values))
        out[strategy] = row
    return out


def format_table(summary: dict, split: str) -> str:
    header = f"| strategy ({split}) | runs | " + " | ".join(label for label, _ in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    for strategy, row in summary.items():
        n = max(c for _, _, c in row.values())
        cells = [f"{m:.3f} ± {s:.3f}" for m, s, _ in row.values()]
        lines.append(f"| {strategy} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="multirun directory of the study")
    parser.add_argument("--split", default="test", choices=("test", "untrained", "heldout"))
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        print(f"no metrics.json under {args.root}", file=sys.stderr)
        return 1
    if args.split == "heldout":
        from ddtas_lightning.config.validation import ConfigError

        try:
            for run in runs:
                run["heldout"] = heldout_metrics(run["dir"], run)
        except ConfigError as exc:  # an unreadable or unsafe checkpoint / config: one line
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(format_table(summarise(runs, args.split), args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
