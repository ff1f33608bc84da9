"""Per-arm statistics over seeds and the static-grid-versus-learned comparison, selected on validation.

* every arm: test R@1, MAP@R, validation R@1 and compute (training CPU seconds, GPU seconds on CUDA,
  images through the model, wall time) as mean +- sample std (ddof 1) over its finished runs (seeds),
  and the thresholds it trained with (a learned lambda: start -> end; AT-ASMS: its mean margins);
* **the grid search, chosen on validation** (the headline): for every seed, the static arm with the
  highest *validation* R@1 at that seed (what a grid search with that seed returns; it costs one run of
  every grid point), and its test R@1 / MAP@R. Also: the single grid point with the best validation R@1
  averaged over the seeds (costs every point x every seed), and, labelled as such, the *oracle*: the
  point with the best mean *test* R@1 (optimistic: the max over noisy arms, chosen on the reported metric);
* each dynamic arm against the per-seed validation pick: the paired difference ``dynamic(s) - pick(s)``
  over the common seeds with a 95% t interval (and a hierarchical bootstrap over seeds and test queries
  where every run saved its per-query results), a verdict, and the compute ratio (the grid's CPU
  seconds for one seed / one run of the arm);
* an Optuna (TPE) sweep, read as one family: best-so-far (the test R@1 of the validation-best trial
  among the first k) against cumulative CPU seconds, and its value at the compute of one learned run.
Runs that selected on the test classes (``data.selection=test``, the papers' protocol) are flagged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ddtas_lightning.report.runs import Arm, Run
from ddtas_lightning.report.stats import Interval, paired_bootstrap, seeds_for_half_width, t_interval


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
    val_r1: Stat = None  # type: ignore[assignment]
    cpu: Stat = None  # type: ignore[assignment]
    gpu: Stat = None  # type: ignore[assignment]
    passes: Stat = None  # type: ignore[assignment]

    @property
    def label(self) -> str:
        return self.arm.label

    @property
    def kind(self) -> str:
        return self.arm.kind

    def seeds(self) -> list[int]:
        return sorted(self.arm.by_seed("R@1"))


def summarize(arm: Arm) -> ArmSummary:
    runs = arm.ok_runs
    return ArmSummary(
        arm, Stat.of(arm.values("R@1")), Stat.of(arm.values("MAP@R")),
        Stat.of([r.wall_time_s for r in runs]), describe_thresholds(arm),
        val_r1=Stat.of([r.val_metric("R@1") for r in runs]), cpu=Stat.of([r.cpu_s for r in runs]),
        gpu=Stat.of([r.gpu_s for r in runs]), passes=Stat.of([r.train_passes for r in runs]),
    )


@dataclass
class GridPick:
    """A grid search's result: per seed, the chosen static arm and its run."""

    name: str                 # "validation, per seed" | "validation, seed mean" | "oracle (test)"
    by_seed: dict[int, Run]   # seed -> the chosen point's run at that seed
    arms: dict[int, str]      # seed -> the chosen arm's label
    cost_cpu_s: float         # CPU seconds the pick needs (every point once per seed it uses)
    runs_needed: int

    def metric(self, name: str) -> Stat:
        return Stat.of([r.metric(name) for r in self.by_seed.values()])

    def values(self, name: str) -> dict[int, float]:
        return {s: r.metric(name) for s, r in self.by_seed.items()}

    def label(self) -> str:
        chosen = sorted(set(self.arms.values()))
        return chosen[0] if len(chosen) == 1 else " / ".join(self.arms[s] for s in sorted(self.arms))


@dataclass
class Versus:
    """One dynamic arm against the grid search chosen on validation (per seed)."""

    arm: ArmSummary
    r1: Interval              # paired differences (fractions): t over seeds
    map_r: Interval
    r1_boot: Interval | None  # hierarchical bootstrap over seeds and queries, if per-query files exist
    map_boot: Interval | None
    compute_ratio: float      # the grid's CPU seconds for one seed / this arm's CPU seconds per run
    seeds_needed: int | None  # seeds for a +-1 R@1 point t interval at the observed spread

    @property
    def verdict(self) -> str:
        """The t interval's verdict on R@1: with few seeds a bootstrap that resamples the seeds has too
        few distinct draws to be trusted, so the t interval is the headline and the bootstrap a column."""
        return self.r1.verdict


@dataclass
class OptunaFamily:
    """The trials of one Optuna study (one training seed), in trial order: TPE, or a grid; with a pruner, its
    pruned trials are no candidates but their compute counts."""

    sweep: Path
    seed: int | None
    trials: list[Run]
    sampler: str = "TPE"

    @property
    def pruned(self) -> list[Run]:
        return [r for r in self.trials if r.pruned]

    @property
    def name(self) -> str:
        """``TPE``, ``Grid``; ``+ pruning`` when some trial was pruned."""
        return self.sampler + (" + pruning" if self.pruned else "")

    @property
    def complete(self) -> list[Run]:
        return [r for r in self.trials if r.ok]

    @property
    def cpu_s(self) -> float:
        """The study's cost: the CPU seconds of all its finished trials, pruned ones included (NaN: none known)."""
        known = [r.cpu_s for r in self.trials if (r.ok or r.pruned) and not math.isnan(r.cpu_s)]
        return sum(known) if known else math.nan

    def best(self) -> Run | None:
        """The validation-best complete trial, what the study returns (a pruned trial is never it; None: no trial
        completed)."""
        found = self.best_so_far()
        return found[-1][3] if found else None

    def best_so_far(self) -> list[tuple[float, float, float, Run]]:
        """After each finished trial (complete or pruned, once one completed): (cumulative CPU s, best validation
        R@1 so far, that trial's test R@1, it). A pruned trial adds its CPU seconds but is never the pick."""
        out, spent, best = [], 0.0, None
        for run in self.trials:
            if not (run.ok or run.pruned):
                continue
            spent += 0.0 if math.isnan(run.cpu_s) else run.cpu_s
            if not run.ok:
                if best is not None:
                    out.append((spent, best.val_metric("R@1"), best.metric("R@1"), best))
                continue
            if best is None or run.val_metric("R@1") > best.val_metric("R@1"):
                best = run
            out.append((spent, best.val_metric("R@1"), best.metric("R@1"), best))
        return out

    def at_budget(self, cpu_s: float) -> Run | None:
        """The validation-best trial among those that fit in ``cpu_s`` (None: not even the first)."""
        chosen = None
        for spent, _, _, run in self.best_so_far():
            if spent <= cpu_s * (1 + 1e-9):
                chosen = run
        return chosen


@dataclass
class Comparison:
    sweep: Path
    arms: list[ArmSummary]
    failed: list[Run]
    picks: list[GridPick]          # [0]: the headline (validation, per seed)
    versus: list[Versus]
    grid_cpu_s: float              # one run of every static arm (mean CPU s per arm, summed): one seed's grid
    grid_wall_s: float
    total_wall_s: float
    num_runs: int
    test_selected: list[Run] = field(default_factory=list)  # runs that chose checkpoints on the test classes
    excluded: list[tuple[Run, str]] = field(default_factory=list)  # not comparable with the rest
    optuna: list[OptunaFamily] = field(default_factory=list)

    @property
    def headline(self) -> GridPick | None:
        return self.picks[0] if self.picks else None

    @property
    def oracle(self) -> GridPick | None:
        return next((p for p in self.picks if p.name.startswith("oracle")), None)

    @property
    def best_static(self) -> ArmSummary | None:
        """The static arm of the headline pick when it is the same at every seed, else the seed-mean pick."""
        picks = [p for p in self.picks if not p.name.startswith("oracle")]
        for pick in picks:
            labels = set(pick.arms.values())
            if len(labels) == 1:
                return next(s for s in self.arms if s.label in labels)
        return None


def _pick_per_seed(static: list[ArmSummary], score) -> dict[int, tuple[str, Run]]:
    """Per seed, the static arm with the highest ``score(run)`` (the first in sweep order on ties)."""
    chosen: dict[int, tuple[str, Run]] = {}
    for s in static:
        for run in s.arm.ok_runs:
            value = score(run)
            if run.seed is None or math.isnan(value):
                continue
            if run.seed not in chosen or value > score(chosen[run.seed][1]):
                chosen[run.seed] = (s.label, run)
    return chosen


def grid_picks(static: list[ArmSummary]) -> list[GridPick]:
    """The grid search's result three ways (see the module docstring)."""
    if not static:
        return []
    grid_cpu = sum(s.cpu.mean for s in static if not math.isnan(s.cpu.mean))
    seeds = sorted({r.seed for s in static for r in s.arm.ok_runs if r.seed is not None})
    picks = []
    per_seed = _pick_per_seed(static, lambda r: r.val_metric("R@1"))
    if per_seed:
        picks.append(GridPick("validation, per seed", {k: v[1] for k, v in per_seed.items()},
                              {k: v[0] for k, v in per_seed.items()}, grid_cpu, len(static)))

    def by_mean(stat_of) -> ArmSummary | None:
        scored = [(stat_of(s).mean, -i, s) for i, s in enumerate(static) if not math.isnan(stat_of(s).mean)]
        return max(scored, key=lambda t: t[:2])[2] if scored else None

    for name, best, cost_seeds in (("validation, seed mean", by_mean(lambda s: s.val_r1), len(seeds)),
                                   ("oracle (test, seed mean)", by_mean(lambda s: s.r1), len(seeds))):
        if best is not None:
            runs = {r.seed: r for r in best.arm.ok_runs if r.seed is not None}
            picks.append(GridPick(name, runs, dict.fromkeys(runs, best.label), grid_cpu * cost_seeds,
                                  len(static) * cost_seeds))
    return picks


def _per_query(run: Run, name: str):
    pq = run.per_query
    return None if pq is None or name not in pq else (pq["ids"], pq[name])


def _bootstrap(arm: ArmSummary, pick: GridPick, name: str) -> Interval | None:
    dyn, ref = [], []
    mine = {r.seed: r for r in arm.arm.ok_runs if r.seed is not None}
    for seed in sorted(set(mine) & set(pick.by_seed)):
        a, b = _per_query(mine[seed], name), _per_query(pick.by_seed[seed], name)
        if a is None or b is None or a[0].shape != b[0].shape or (a[0] != b[0]).any():
            return None  # a run without per-query results, or other queries: no bootstrap
        dyn.append(a[1])
        ref.append(b[1])
    return paired_bootstrap(dyn, ref) if len(dyn) >= 2 else None


def versus(arm: ArmSummary, pick: GridPick) -> Versus:
    diffs = {}
    for name in ("R@1", "MAP@R"):
        mine, ref = arm.arm.by_seed(name), pick.values(name)
        diffs[name] = [mine[s] - ref[s] for s in sorted(set(mine) & set(ref))]
    r1 = t_interval(diffs["R@1"])
    sd = statistics.stdev(diffs["R@1"]) if len(diffs["R@1"]) > 1 else math.nan
    ratio = pick.cost_cpu_s / arm.cpu.mean if arm.cpu.mean and not math.isnan(arm.cpu.mean) else math.nan
    return Versus(arm, r1, t_interval(diffs["MAP@R"]), _bootstrap(arm, pick, "R@1"), _bootstrap(arm, pick, "MAP@R"),
                  ratio, seeds_for_half_width(sd, 0.01))


def comparable(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, str]]]:
    """The runs of the most common protocol (dataset, backbone, run length, loss); the others, with why."""
    finished = [r for r in runs if r.ok]
    if not finished:
        return runs, []
    counts: dict[tuple, int] = {}
    for r in finished:
        counts[r.protocol] = counts.get(r.protocol, 0) + 1
    main = max(counts, key=counts.get)
    keep, excluded = [], []
    for r in runs:
        if not r.ok or r.protocol == main:
            keep.append(r)
            continue
        what = [f"{n} {a!r} (the sweep's: {b!r})" for n, a, b in zip(("dataset", "backbone", "run length", "loss"),
                                                                       r.protocol, main) if a != b]
        excluded.append((r, "not comparable: " + ", ".join(what)))
    return keep, excluded


def compare(sweep: Path, arms: list[Arm], optuna: list[OptunaFamily] | None = None,
            excluded: list[tuple[Run, str]] | None = None) -> Comparison:
    summaries = [summarize(arm) for arm in arms]
    static = [s for s in summaries if s.kind == "static" and s.r1.n]
    picks = grid_picks(static)
    headline = picks[0] if picks else None
    out = [versus(s, headline) for s in summaries if s.kind == "dynamic" and s.r1.n] if headline else []
    runs = [r for a in arms for r in a.runs]
    return Comparison(
        sweep=sweep,
        arms=summaries,
        failed=[r for r in runs if not r.ok],
        picks=picks,
        versus=out,
        grid_cpu_s=sum(s.cpu.mean for s in static if not math.isnan(s.cpu.mean)) if static else math.nan,
        grid_wall_s=sum(s.wall.mean for s in static if not math.isnan(s.wall.mean)) if static else math.nan,
        total_wall_s=sum(r.wall_time_s for r in runs if r.ok and not math.isnan(r.wall_time_s)),
        num_runs=len(runs),
        test_selected=[r for r in runs if r.ok and r.selection == "test"],
        excluded=list(excluded or []),
        optuna=list(optuna or []),
    )
