"""The comparison as text (stdout) and as a markdown report beside the plots: the arms table, the
grid search chosen on validation (the headline) and the oracle test pick (labelled), every dynamic arm
against the validation pick (paired 95% intervals, verdicts, compute), the Optuna family at the compute
of one learned run, and the flags (test-set selection, excluded and failed runs)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ddtas_lightning.report.stats import t_interval
from ddtas_lightning.report.summary import Comparison, GridPick, Stat

ARM_HEADER = ("arm", "kind", "policy + miner", "thresholds", "val R@1 %", "test R@1 %", "test MAP@R %",
              "CPU s/run", "passes/run", "wall s", "runs")
VERSUS_HEADER = ("dynamic arm", "test R@1 %", "ΔR@1 vs grid [95% t]", "verdict", "ΔMAP@R [95% t]", "verdict",
                 "ΔR@1 bootstrap [95%]", "CPU s/run", "grid / run", "seeds for ±1")


def plural(n: int, noun: str) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _passes(stat: Stat) -> str:
    if math.isnan(stat.mean):
        return "n/a"
    return f"{stat.mean / 1000:.1f}k img"


def arm_rows(c: Comparison) -> list[tuple[str, ...]]:
    return [
        (s.label, s.kind, s.arm.first.policy, s.thresholds, s.val_r1.fmt(100), s.r1.fmt(100), s.map_r.fmt(100),
         s.cpu.fmt(digits=0), _passes(s.passes), s.wall.fmt(digits=0), f"{len(s.arm.ok_runs)}/{len(s.arm.runs)}")
        for s in c.arms
    ]


def versus_rows(c: Comparison) -> list[tuple[str, ...]]:
    rows = []
    for v in c.versus:
        boot = v.r1_boot.fmt() if v.r1_boot is not None else "n/a (no per-query files)"
        rows.append((v.arm.label, v.arm.r1.fmt(100), v.r1.fmt(), v.r1.verdict, v.map_r.fmt(), v.map_r.verdict,
                     boot, v.arm.cpu.fmt(digits=0), "n/a" if math.isnan(v.compute_ratio) else f"{v.compute_ratio:.1f}x",
                     "n/a" if v.seeds_needed is None else str(v.seeds_needed)))
    return rows


def _pick_line(p: GridPick) -> str:
    return (f"{p.label()}: test R@1 {p.metric('R@1').fmt(100)}, MAP@R {p.metric('MAP@R').fmt(100)} "
            f"({plural(len(p.by_seed), 'seed')}; picking costs {plural(p.runs_needed, 'run')}, {p.cost_cpu_s:.0f} CPU s)")


def headline_lines(c: Comparison) -> list[str]:
    lines = []
    if c.test_selected:
        lines.append(f"WARNING: {len(c.test_selected)} of the runs chose their checkpoints on the TEST classes "
                     "(data.selection=test, the papers' protocol): their numbers are optimistic")
    if not c.picks:
        lines.append("no finished static run: no grid to compare the dynamic arms with")
        return lines
    names = {"validation, per seed": "grid search, chosen on validation per seed (headline)",
             "validation, seed mean": "grid point chosen on validation, seed mean",
             "oracle (test, seed mean)": "oracle: grid point chosen on the TEST metric it reports (optimistic; not a result)"}
    for p in c.picks:
        lines.append(f"{names.get(p.name, p.name)}: {_pick_line(p)}")
    return lines


def versus_lines(c: Comparison) -> list[str]:
    head = c.headline
    lines = []
    for v in c.versus:
        lines.append(
            f"dynamic {v.arm.label}: ΔR@1 {v.r1.fmt()} points, {v.r1.verdict}; ΔMAP@R {v.map_r.fmt()}, "
            f"{v.map_r.verdict} (paired over {plural(v.r1.n, 'seed')} vs {head.name if head else 'n/a'}); one run "
            f"{v.arm.cpu.fmt(digits=0)} CPU s, the grid costs {v.compute_ratio:.1f}x that per seed"
            + (f"; ±1 point would need ~{v.seeds_needed} seeds" if v.seeds_needed and v.r1.n >= 2 else ""))
    return lines


def optuna_lines(c: Comparison) -> list[str]:
    lines = []
    learned = [v.arm for v in c.versus]
    for fam in c.optuna:
        curve = fam.best_so_far()
        if not curve:
            lines.append(f"{fam.name} {fam.sweep.name} (seed {fam.seed}): no finished trial")
            continue
        spent, val, test, best = curve[-1]
        finished = sum(1 for r in fam.trials if r.ok or r.pruned)
        pruned = f" ({len(fam.pruned)} pruned)" if fam.pruned else ""
        lines.append(f"{fam.name} {fam.sweep.name} (seed {fam.seed}): {finished} trials{pruned}, {spent:.0f} CPU s; "
                     f"validation-best trial {best.path.name} (λ {best.loss_threshold:.3f}"
                     + (f", m {best.margin:.3f}" if best.margin is not None else "")
                     + f"): val R@1 {100 * val:.1f}, test R@1 {100 * test:.1f}")
        for arm in learned:
            budget = arm.cpu.mean
            if math.isnan(budget):
                continue
            pick = fam.at_budget(budget)
            within = "no trial fits" if pick is None else f"test R@1 {100 * pick.metric('R@1'):.1f} ({pick.path.name})"
            lines.append(f"  at the compute of one {arm.label} run ({budget:.0f} CPU s): {within}")
    for arm in learned:  # paired by seed: the learned run against TPE at the same compute
        diffs = []
        mine = arm.arm.by_seed("R@1")
        for fam in c.optuna:
            pick = fam.at_budget(arm.cpu.mean) if not math.isnan(arm.cpu.mean) else None
            if pick is not None and fam.seed in mine:
                diffs.append(mine[fam.seed] - pick.metric("R@1"))
        if diffs:
            iv = t_interval(diffs)
            lines.append(f"{arm.label} vs TPE at equal compute: ΔR@1 {iv.fmt()} over {iv.n} seed(s), {iv.verdict}")
    return lines


def footer_lines(c: Comparison) -> list[str]:
    lines = [f"the grid (one run of each of {sum(1 for s in c.arms if s.kind == 'static' and s.r1.n)} points): "
             f"{c.grid_cpu_s:.0f} CPU s per seed" if not math.isnan(c.grid_cpu_s) else "no grid"]
    lines.append(f"sweep: {c.num_runs} runs, {len(c.failed)} failed, {c.total_wall_s:.0f} s of run wall time")
    return lines


def summary_lines(c: Comparison) -> list[str]:
    return [*headline_lines(c), *versus_lines(c), *optuna_lines(c), *footer_lines(c)]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    return table


def _problems(c: Comparison) -> list[str]:
    out = []
    if c.excluded:
        out += ["left out (not comparable):"] + [f"  {r.path.name}: {why}" for r, why in c.excluded]
    if c.failed:
        out += ["failed runs:"] + [f"  {r.path.name} ({' '.join(r.overrides)}): {r.error}" for r in c.failed]
    return out


def text_report(c: Comparison) -> str:
    out = [f"sweep {c.sweep}", "", *_table(ARM_HEADER, arm_rows(c)), "", *headline_lines(c)]
    if c.versus:
        out += ["", *_table(VERSUS_HEADER, versus_rows(c))]
    out += ["", *versus_lines(c), *optuna_lines(c), *footer_lines(c)]
    problems = _problems(c)
    return "\n".join(out + ([""] + problems if problems else []))


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(x) for x in row) + " |" for row in rows)]


def markdown_report(c: Comparison, plots: list[Path], out_dir: Path) -> str:
    lines = [f"# Static grid versus learned thresholds: `{c.sweep.name}`", "",
             f"Sweep `{c.sweep}`. Test metrics of each run's checkpoint chosen on validation, in %, mean ± std "
             "over seeds; Δ = paired difference to the grid search chosen on validation (per seed), in points, "
             "with its 95% interval; CPU s = training process CPU seconds (training and its validations); "
             "passes = images through the model in training (forward + backward).", ""]
    lines += [f"- **{line}**" if line.startswith("WARNING") else f"- {line}" for line in headline_lines(c)]
    lines += ["", *_md_table(ARM_HEADER, arm_rows(c))]
    if c.versus:
        lines += ["", "## Dynamic arms against the validation-chosen grid", "", *_md_table(VERSUS_HEADER, versus_rows(c))]
        lines += ["", *(f"- {line}" for line in versus_lines(c))]
    if c.optuna:
        lines += ["", "## Optuna TPE at equal compute", "", *(f"- {line}" for line in optuna_lines(c))]
    lines += ["", *(f"- {line}" for line in footer_lines(c))]
    if c.excluded:
        lines += ["", "## Left out (not comparable)", ""] + [f"- `{r.path.name}`: {why}" for r, why in c.excluded]
    if c.failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.path.name}` (`{' '.join(r.overrides)}`): {(r.error or '').replace('|', '/')}" for r in c.failed]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out_dir)})" for p in plots]
    return "\n".join(lines) + "\n"
