"""The learned-threshold study report: ``python -m ddtas_lightning.study STUDY_DIR [--out OUT]`` (= ``make study``).

STUDY_DIR holds one directory per setting (``<images>_<steps>``, written by ``make study``), each with a
``grid`` sweep (``arm=study/static`` at every grid lambda) and a ``learned`` sweep (``arm=study/<arm>``
started from each end of the grid; further ``learned_<name>`` sweeps are read too), all of
``experiment=threshold_study`` (or ``threshold_study_pretrained``), and the pruned searches
(``search_<name>/seed<k>/``: one Optuna study of ``hparams_search=<name>`` per training seed, with its
``optuna.json``; a ``search_<name>/`` that is itself one Optuna sweep is read too). A setting needs the grid
and at least one learned or search dir. Per setting it reuses the comparison of
:mod:`ddtas_lightning.report.summary`: the grid search chosen on validation per seed is the reference, every
learned arm x start gets its paired-by-seed test R@1 difference with a 95% t interval, and its CPU seconds
against the grid's. On top of that:

* **searches**, one family per ``search_<name>``: per training seed, its pick is the validation-best
  *complete* trial (a pruned trial never is), whose test R@1 is paired by seed with the grid's pick exactly as
  a learned arm's (seeds the grid lacks are left out, and said so); its compute per seed is the CPU seconds of
  all its trials, pruned ones included, so its grid/arm ratio is the grid's CPU seconds per seed over that;
  the row names its sampler, pruner and trials per seed (complete / pruned), its lambda column the lambdas it
  picked;

* **does the threshold matter here?** the grid's best minus worst point (seed-mean test R@1) with the paired
  t interval: a setting whose interval does not clear 1 point (the +-1 the study's seeds are sized for) is
  flagged flat: there any lambda is near the best, and reaching it proves nothing;
* **target** per learned arm: within 0.5 R@1 of the validation-selected grid (mean difference >= -0.5 and,
  decided, the interval's lower end >= -0.5) at <= 1/4 of the grid's CPU seconds;
* the **ablation table**: one row per arm x start and per search, one column per setting;
* ``lambda_<setting>.png``: lambda over steps for every arm and start (seed means; thin lines: seeds), the
  grid point chosen on validation (seed mean) drawn across.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ddtas_lightning.report.kinds import class_name
from ddtas_lightning.report.runs import Arm, Run, SweepError, _select, load_sweep, run_dirs
from ddtas_lightning.report.searches import Search, choices, load_search
from ddtas_lightning.report.stats import Interval, t_interval
from ddtas_lightning.report.summary import Comparison, Versus, compare
from ddtas_lightning.runtime.atomic_output import describe_os_error, staged_outputs

TARGET_GAP = 0.005          # 0.5 R@1 points (metrics are fractions)
TARGET_COMPUTE = 0.25       # of the grid's CPU seconds (one seed)
MATTERS = 0.01              # the grid's best - worst interval must clear 1 point: the +-1 the seeds are sized for


def _override(run: Run, key: str) -> str | None:
    for o in run.overrides:
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


# Policies whose arm has no start (threshold_policy=many_heads: the whole grid in one run, issue 23)
NO_START = frozenset({"ManyHeadsThreshold"})


def arm_label(run: Run) -> str:
    """``λ 0.2`` for a grid point; ``hg_nca_heldout from 0.8`` for a learned arm (start = loss.threshold);
    the arm alone (``many_heads``) for an arm without a start."""
    arm = (_override(run, "arm") or "?").removeprefix("study/")
    if class_name(run.policy_target) in NO_START:
        return arm
    start = run.loss_threshold
    start_s = "?" if start is None else f"{start:g}"
    return f"λ {start_s}" if arm == "static" else f"{arm} from {start_s}"


def group(runs: list[Run]) -> list[Arm]:
    """Runs grouped by arm x start, in sweep order (grid first)."""
    arms: dict[str, Arm] = {}
    for run in runs:
        label = arm_label(run)
        arms.setdefault(label, Arm(label, [])).runs.append(run)
    return list(arms.values())


@dataclass
class Setting:
    name: str
    comparison: Comparison
    spread: Interval | None       # best minus worst grid point (seed-mean test R@1), paired over seeds
    best_label: str | None
    worst_label: str | None
    searches: list[Search] = field(default_factory=list)  # the search_<name> families, against the same grid

    @property
    def threshold_matters(self) -> bool:
        return self.spread is not None and self.spread.low > MATTERS


def grid_spread(c: Comparison) -> tuple[Interval | None, str | None, str | None]:
    static = [s for s in c.arms if s.kind == "static" and s.r1.n >= 2]
    if len(static) < 2:
        return None, None, None
    best = max(static, key=lambda s: s.r1.mean)
    worst = min(static, key=lambda s: s.r1.mean)
    b, w = best.arm.by_seed("R@1"), worst.arm.by_seed("R@1")
    return t_interval([b[s] - w[s] for s in sorted(set(b) & set(w))]), best.label, worst.label


def load_setting(path: Path) -> Setting:
    runs: list[Run] = []
    sweeps = [path / "grid", *sorted(p for p in path.glob("learned*") if p.is_dir())]
    search_dirs = sorted(p for p in path.glob("search_*") if p.is_dir())
    if len(sweeps) < 2 and not search_dirs:
        raise SweepError(f"{path / 'learned'}: missing; a study setting holds a grid/ and a learned/ sweep "
                         "(make study writes them; more learned arms may go to learned_<name>/) or a "
                         "search_<name>/ (Optuna studies, one per seed)")
    for sweep in sweeps:
        if not run_dirs(sweep):
            raise SweepError(f"{sweep}: holds no runs (make study writes them)")
        runs += load_sweep(sweep)
    c = compare(path, group(runs))
    for a in c.arms:  # many heads: which grid lambda the validation chose, per seed (not a start -> end)
        if class_name(a.arm.first.policy_target) in NO_START:
            a.thresholds = describe_heads(a.arm)
    searches = [load_search(d, c.headline) for d in search_dirs]
    return Setting(path.name, c, *grid_spread(c), searches=searches)


def describe_heads(arm: Arm) -> str:
    """``6 heads λ -0.2…0.8, chose λ 0.2 x7, 0.4 x5`` (the validation's choice over the seeds)."""
    runs = arm.ok_runs or arm.runs
    grid = _select(runs[0].config, "threshold_policy.thresholds") or []
    picks = choices((r.metrics.get("val_at_best", {}).get("val/selected_lambda") for r in arm.ok_runs), digits=6)
    span = f"{len(grid)} heads λ {min(grid):g}…{max(grid):g}" if grid else "heads"
    return f"{span}, chose λ {picks}" if picks else span


def settings(study: Path) -> list[Setting]:
    dirs = sorted(p for p in study.iterdir() if p.is_dir() and (p / "grid").is_dir())
    if not dirs:
        raise SweepError(f"{study}: no study settings (sub-directories with grid/ and learned/ sweeps); "
                         "run make study")
    return [load_setting(d) for d in dirs]


def meets_target(v) -> str:
    gap_ok = v.r1.mean >= -TARGET_GAP
    cost_ok = not math.isnan(v.compute_ratio) and 1 / v.compute_ratio <= TARGET_COMPUTE
    if not cost_ok:
        return "no (compute)"
    if not gap_ok:
        return "no"
    return "yes" if v.r1.low >= -TARGET_GAP else "mean only"


def _pp(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def trained_vs_untrained(c: Comparison, metric: str = "R@1") -> tuple[Interval, float] | None:
    """The grid chosen on validation minus the untrained model, test R@1 paired by seed, and the untrained
    model's mean: with a head that starts as the identity (experiment=threshold_study_pretrained) the untrained
    model is the raw pretrained features, the baseline training must beat. None without untrained metrics."""
    head = c.headline
    pairs = []
    for run in (head.by_seed.values() if head is not None else ()):
        m = run.metrics or {}
        untrained = (m.get("untrained") or {}).get(f"untrained/{metric}")
        if untrained is not None and (m.get("test") or {}).get(f"test/{metric}") is not None:
            pairs.append((m["test"][f"test/{metric}"], untrained))
    if not pairs:
        return None
    return t_interval([t - u for t, u in pairs]), sum(u for _, u in pairs) / len(pairs)


def setting_table(s: Setting) -> list[str]:
    c = s.comparison
    head = c.headline
    lines = [f"### {s.name}", ""]
    if head is None:
        return lines + ["no finished grid runs", ""]
    spread = "n/a" if s.spread is None else (f"{s.best_label} − {s.worst_label}: {_pp(s.spread.mean)} "
                                             f"[{_pp(s.spread.low)}, {_pp(s.spread.high)}]")
    lines += [
        f"- grid chosen on validation per seed: test R@1 {head.metric('R@1').fmt(100)} "
        f"(picks: {head.label()}), {c.grid_cpu_s:.0f} CPU s per seed",
        f"- grid best − worst point (test R@1, paired 95% t): {spread}"
        + ("" if s.threshold_matters else "  **flat (the interval does not clear 1 point): this setting proves "
           "nothing**"),
        f"- oracle (test-chosen, optimistic): {c.oracle.label() if c.oracle else 'n/a'} "
        f"{c.oracle.metric('R@1').fmt(100) if c.oracle else ''}",
        *_untrained_line(c),
        "",
        "| arm | seeds | test R@1 | λ start→end | ΔR@1 vs grid [95% t] | ± | verdict | CPU s | grid/arm | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s_ in c.arms:
        if s_.kind == "static":
            lines.append(f"| {s_.label} | {s_.r1.n} | {s_.r1.fmt(100)} | {s_.thresholds} | | | | "
                         f"{s_.cpu.fmt(digits=1)} | | |")
    lines += [_versus_row(v.arm.label, v) for v in c.versus]
    for search in s.searches:
        if search.versus is None:
            lines.append(f"| {search.label} | 0 | n/a | | | | | | | |")
        else:
            lines.append(_versus_row(search.label, search.versus))
    return lines + [""]


def _versus_row(label: str, v: Versus) -> str:
    """A learned arm's or a search's row: against the grid chosen on validation, paired by seed."""
    a = v.arm
    return (f"| {label} | {a.r1.n} | {a.r1.fmt(100)} | {a.thresholds} | {_pp(v.r1.mean)} "
            f"[{_pp(v.r1.low)}, {_pp(v.r1.high)}] | {100 * v.r1.half_width:.1f} | {v.verdict} | "
            f"{a.cpu.fmt(digits=1)} | {v.compute_ratio:.1f}x | {meets_target(v)} |")


def _untrained_line(c: Comparison) -> list[str]:
    found = trained_vs_untrained(c)
    if found is None:
        return []
    d, raw = found
    beats = "beats it" if d.low > 0 else ("worse" if d.high < 0 else "not distinguishable from it")
    line = (f"- trained (the grid chosen on validation) − untrained model (test R@1 {100 * raw:.1f}; the raw "
            f"pretrained features where the head starts as the identity), paired 95% t: {_pp(d.mean)} "
            f"[{_pp(d.low)}, {_pp(d.high)}]: {beats}")
    found_map = trained_vs_untrained(c, "MAP@R")
    if found_map is not None:
        dm, raw_map = found_map
        line += f"; MAP@R {100 * raw_map:.1f} -> {100 * (raw_map + dm.mean):.1f}, {_pp(dm.mean)} [{_pp(dm.low)}, {_pp(dm.high)}]"
    return [line]


def _all_versus(s: Setting) -> list[Versus]:
    """The setting's learned arms, then its searches (``search <name>``), each against the grid."""
    return [*s.comparison.versus, *(x.versus for x in s.searches if x.versus is not None)]


def ablation_table(all_settings: list[Setting]) -> list[str]:
    """Rows: learned arm x start, then each search; columns: settings; cells: ΔR@1 [95% t] (verdict)."""
    labels: list[str] = []
    for s in all_settings:
        for v in _all_versus(s):
            if v.arm.label not in labels:
                labels.append(v.arm.label)
    head = "| arm | " + " | ".join(s.name + ("" if s.threshold_matters else " (flat)") for s in all_settings) + " |"
    lines = [head, "|---|" + "---|" * len(all_settings)]
    for label in labels:
        cells = []
        for s in all_settings:
            v = next((v for v in _all_versus(s) if v.arm.label == label), None)
            cells.append("–" if v is None else f"{_pp(v.r1.mean)} [{_pp(v.r1.low)}, {_pp(v.r1.high)}] "
                         f"{meets_target(v)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def grid_choice(c: Comparison) -> float | None:
    """The grid lambda with the best seed-mean validation R@1 (what a grid search over seeds returns)."""
    pick = next((p for p in c.picks if p.name == "validation, seed mean"), None)
    if pick is None or not pick.by_seed:
        return None
    return next(iter(pick.by_seed.values())).loss_threshold


def plot_lambda(s: Setting, path: Path) -> Path | None:
    """lambda over steps per learned arm x start (and the learned margin m beside it, where one was)."""
    from ddtas_lightning.report.plots import _seed_mean, plt

    learned = [a for a in s.comparison.arms if a.kind == "dynamic"]
    curves = {key: {a.label: [r.curves[key] for r in a.arm.ok_runs if r.curves.get(key)] for a in learned}
              for key in ("train/lambda", "train/margin")}
    learned = [a for a in learned if curves["train/lambda"][a.label]]
    if not learned:
        return None
    with_m = any(curves["train/margin"].values())
    fig, axes = plt.subplots(1, 2 if with_m else 1, figsize=(15 if with_m else 10, 5.5), squeeze=False)
    # one colour per arm, one line style per start (the arms outnumber a colour cycle once per start)
    names = list(dict.fromkeys(a.label.split(" from ")[0] for a in learned))
    starts = list(dict.fromkeys(a.label.split(" from ")[-1] for a in learned))
    cycle = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors = {a.label: cycle(names.index(a.label.split(" from ")[0])) for a in learned}
    styles = {a.label: ("-", "--", ":", "-.")[starts.index(a.label.split(" from ")[-1]) % 4] for a in learned}
    chosen = grid_choice(s.comparison)
    for ax, key, name in zip(axes[0], ("train/lambda", "train/margin"), ("λ", "m")):
        for a in learned:
            for curve in curves[key][a.label]:
                ax.plot(*zip(*curve), color=colors[a.label], alpha=0.15, linewidth=0.6)
            if curves[key][a.label]:
                ax.plot(*_seed_mean(curves[key][a.label]), color=colors[a.label], linestyle=styles[a.label],
                        linewidth=2, label=f"{a.label} ({len(curves[key][a.label])} seeds)")
        if key == "train/lambda" and chosen is not None:
            ax.axhline(chosen, color="black", linestyle="--", linewidth=1.5,
                       label=f"grid λ chosen on validation (seed mean): {chosen:g}")
        if key == "train/margin":
            ax.axhline(0.1, color="grey", linestyle=":", linewidth=1.2, label="the grid's fixed m = 0.1")
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[0][0].set_title(f"Learned λ (seed means; thin: each seed), {s.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(all_settings: list[Setting]) -> str:
    lines = ["# Learned thresholds vs the validation-selected grid (make study)", "",
             "ΔR@1 in points, test classes, paired by seed, 95% t interval. Target: ΔR@1 ≥ −0.5 "
             f"(\"yes\": the whole interval; \"mean only\": the mean) at ≤ {TARGET_COMPUTE:g} of the grid's "
             "CPU seconds. A search (search_<name>: an Optuna study per seed, pruned trials included in its CPU "
             "seconds) is judged as an arm: its validation-best complete trial per seed.", "", "## Ablation", ""]
    lines += ablation_table(all_settings) + ["", "## Per setting", ""]
    for s in all_settings:
        lines += setting_table(s)
    return "\n".join(lines) + "\n"


def write_report(found: list[Setting], out: Path) -> str:
    """``report.md`` and ``lambda_<setting>.png`` into ``out``, staged and moved into place together (a full or
    read-only disk leaves no 0-byte report.md: runtime/atomic_output.py); returns the report's text."""
    text = report(found)
    try:
        with staged_outputs(out, last=("report.md",)) as staging:
            (staging / "report.md").write_text(text)
            for s in found:
                plot_lambda(s, staging / f"lambda_{s.name}.png")
    except OSError as exc:
        raise SweepError(f"--out {out}: cannot write the report there ({describe_os_error(exc)}); nothing was kept. "
                         "Free space or choose a writable directory") from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddtas_lightning.study", description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="a study dir (multirun/threshold_study/<date>_<time>)")
    parser.add_argument("--out", type=Path, default=None, help="default <study>/report")
    args = parser.parse_args(argv)
    out = args.out or args.study / "report"
    try:
        found = settings(args.study)
        text = write_report(found, out)
    except (SweepError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"written: {out}/report.md, lambda_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Setting", "ablation_table", "arm_label", "grid_spread", "main", "meets_target",
           "settings", "write_report"]
