"""Per-arm statistics over seeds and the static-grid-versus-learned comparison.

* every arm: R@1, MAP@R and wall time as mean +- sample std (ddof 1) over its finished runs (seeds), and
  the thresholds it trained with (a learned lambda: start -> end; AT-ASMS: its mean margins);
* the best static arm: the grid point with the highest mean R@1. It is picked on the same metric it is
  reported with, so it is the grid's optimistic best (an oracle pick);
* each dynamic arm against it: the R@1 / MAP@R gap in points, paired by seed (``dynamic(s) - best(s)``,
  mean +- std over the seeds both have), and the compute: the wall time of the whole static grid (one run
  of every static arm) divided by one run of the dynamic arm.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ddtas_lightning.report.runs import Arm, Run


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (NaN below two values) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        values = [v for v in values if not math.isnan(v)]
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(mean, std, len(values))

    def fmt(self, scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
        if math.isnan(self.mean):
            return "n/a"
        mean = f"{self.mean * scale:{'+' if sign else ''}.{digits}f}"
        return mean if math.isnan(self.std) else f"{mean} ± {self.std * scale:.{digits}f}"


def learns_lambda(arm: Arm) -> bool:
    """Whether lambda moved during any of the arm's runs (a learned-threshold policy)."""
    for run in arm.ok_runs:
        values = [v for _, v in run.curves.get("train/lambda", [])]
        if values and max(values) - min(values) > 1e-9:
            return True
    return False


def adapts_margin(arm: Arm) -> bool:
    """Whether the miner logged an adaptive ratio (AT-ASMS)."""
    return any("mining/ratio" in run.curves for run in arm.ok_runs)


def _mean_of_curve(runs: list[Run], key: str) -> float:
    return statistics.fmean(v for r in runs for _, v in r.curves.get(key, [])) if any(
        r.curves.get(key) for r in runs) else math.nan


def describe_thresholds(arm: Arm) -> str:
    """``λ 0.50, m 0.10`` for a grid point; ``λ 0.70→0.61 ± 0.02`` for a learned lambda (start -> the
    last step, over seeds); ``m 0.10 adaptive (γ+ 0.148, γ- 0.005)`` for AT-ASMS (means over steps)."""
    runs = arm.ok_runs or arm.runs
    first = arm.first
    parts = []
    if learns_lambda(arm):
        starts = [r.curves["train/lambda"][0][1] for r in arm.ok_runs if r.curves.get("train/lambda")]
        ends = Stat.of([r.curves["train/lambda"][-1][1] for r in arm.ok_runs if r.curves.get("train/lambda")])
        parts.append(f"λ {statistics.fmean(starts):.2f}→{ends.fmt(digits=2)}")
    elif first.loss_threshold is not None:
        parts.append(f"λ {first.loss_threshold:.2f}")
    if first.margin is not None:
        if adapts_margin(arm):
            gp, gn = _mean_of_curve(runs, "mining/gamma_pos"), _mean_of_curve(runs, "mining/gamma_neg")
            parts.append(f"m {first.margin:.2f} adaptive (γ+ {gp:.3f}, γ- {gn:.3f})")
        else:
            parts.append(f"m {first.margin:.2f}")
    return ", ".join(parts) or "-"


@dataclass
class ArmSummary:
    arm: Arm
    r1: Stat
    map_r: Stat
    wall: Stat
    thresholds: str

    @property
    def label(self) -> str:
        return self.arm.label

    @property
    def kind(self) -> str:
        return self.arm.kind


@dataclass
class Versus:
    """One dynamic arm against the best static arm."""

    arm: ArmSummary
    r1_gap: Stat      # R@1 points (fraction), paired by seed
    map_gap: Stat
    paired_seeds: int  # 0: the gap is the difference of the means
    compute_ratio: float  # wall time of the whole static grid / one run of this arm


@dataclass
class Comparison:
    sweep: Path
    arms: list[ArmSummary]
    failed: list[Run]
    best_static: ArmSummary | None
    versus: list[Versus]
    grid_wall_s: float   # one run of every static arm (mean wall time per arm, summed)
    total_wall_s: float  # every finished run of the sweep
    num_runs: int


def _gap(arm: Arm, best: Arm, name: str) -> tuple[Stat, int]:
    mine, theirs = arm.by_seed(name), best.by_seed(name)
    seeds = sorted(s for s in mine if s in theirs and not math.isnan(mine[s]) and not math.isnan(theirs[s]))
    if seeds:
        return Stat.of([mine[s] - theirs[s] for s in seeds]), len(seeds)
    diff = Stat.of(arm.values(name)).mean - Stat.of(best.values(name)).mean
    return Stat(diff, math.nan, 1 if not math.isnan(diff) else 0), 0


def compare(sweep: Path, arms: list[Arm]) -> Comparison:
    summaries = [
        ArmSummary(arm, Stat.of(arm.values("R@1")), Stat.of(arm.values("MAP@R")),
                   Stat.of([r.wall_time_s for r in arm.ok_runs]), describe_thresholds(arm))
        for arm in arms
    ]
    static = [s for s in summaries if s.kind == "static" and s.r1.n]
    best = max(static, key=lambda s: s.r1.mean) if static else None
    grid_wall = sum(s.wall.mean for s in static if not math.isnan(s.wall.mean)) if static else math.nan
    versus = []
    if best is not None:
        for s in summaries:
            if s.kind != "dynamic" or not s.r1.n:
                continue
            r1_gap, paired = _gap(s.arm, best.arm, "R@1")
            map_gap, _ = _gap(s.arm, best.arm, "MAP@R")
            ratio = grid_wall / s.wall.mean if s.wall.mean and not math.isnan(s.wall.mean) else math.nan
            versus.append(Versus(s, r1_gap, map_gap, paired, ratio))
    runs = [r for a in arms for r in a.runs]
    return Comparison(
        sweep=sweep,
        arms=summaries,
        failed=[r for r in runs if not r.ok],
        best_static=best,
        versus=versus,
        grid_wall_s=grid_wall,
        total_wall_s=sum(r.wall_time_s for r in runs if r.ok and not math.isnan(r.wall_time_s)),
        num_runs=len(runs),
    )
