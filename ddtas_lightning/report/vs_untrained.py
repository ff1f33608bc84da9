"""Does training beat the model it starts from? ``python -m ddtas_lightning.report.vs_untrained SWEEP [SWEEP ...]``.

For each sweep (a Hydra multirun whose runs had ``evaluate_before_training=true``): the untrained and the
trained test R@1 and MAP@R (seed means), and trained minus untrained paired by run with a 95% t interval.
With a head that starts as the identity (``backbone.init=identity`` / ``backbone.head_init=identity``) the
untrained model is the raw pretrained features, so the interval says whether a fine-tuning regime beats them
(docs/real_data.md's table comes from it). Runs without untrained or test metrics are left out and counted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ddtas_lightning.report.runs import SweepError, load_sweep
from ddtas_lightning.report.stats import Interval, t_interval

METRICS = ("R@1", "MAP@R")


@dataclass
class VersusUntrained:
    sweep: Path
    runs: int
    left_out: int
    untrained: dict[str, float]   # seed means, fractions
    trained: dict[str, float]
    delta: dict[str, Interval]    # trained - untrained, paired by run


def versus_untrained(sweep: Path) -> VersusUntrained:
    pairs: dict[str, list[tuple[float, float]]] = {m: [] for m in METRICS}
    runs = load_sweep(sweep)
    used = 0
    for run in runs:
        m = run.metrics or {}
        untrained, test = m.get("untrained") or {}, m.get("test") or {}
        if not all(f"untrained/{k}" in untrained and f"test/{k}" in test for k in METRICS):
            continue
        used += 1
        for k in METRICS:
            pairs[k].append((test[f"test/{k}"], untrained[f"untrained/{k}"]))
    if not used:
        raise SweepError(f"{sweep}: no run has both untrained and test metrics (train with "
                         "evaluate_before_training=true and test_after_training=true)")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return VersusUntrained(
        sweep, used, len(runs) - used,
        {k: mean([u for _, u in pairs[k]]) for k in METRICS},
        {k: mean([t for t, _ in pairs[k]]) for k in METRICS},
        {k: t_interval([t - u for t, u in pairs[k]]) for k in METRICS})


def table(rows: list[VersusUntrained]) -> str:
    pp = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    lines = ["| sweep | runs | untrained R@1 | trained R@1 | ΔR@1 [95% t] | untrained MAP@R | trained MAP@R | "
             "ΔMAP@R [95% t] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d1, dm = r.delta["R@1"], r.delta["MAP@R"]
        lines.append(f"| {r.sweep} | {r.runs}{f' ({r.left_out} left out)' if r.left_out else ''} | "
                     f"{100 * r.untrained['R@1']:.1f} | {100 * r.trained['R@1']:.1f} | {pp(d1.mean)} "
                     f"[{pp(d1.low)}, {pp(d1.high)}] | {100 * r.untrained['MAP@R']:.1f} | "
                     f"{100 * r.trained['MAP@R']:.1f} | {pp(dm.mean)} [{pp(dm.low)}, {pp(dm.high)}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddtas_lightning.report.vs_untrained",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="multirun sweep dirs")
    args = parser.parse_args(argv)
    try:
        print(table([versus_untrained(s) for s in args.sweeps]))
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
