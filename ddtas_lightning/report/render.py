"""The comparison as text (stdout) and as a markdown report beside the plots."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ddtas_lightning.report.summary import Comparison

HEADER = ("arm", "kind", "policy + miner", "thresholds", "R@1 %", "MAP@R %", "wall s", "runs")


def _rows(c: Comparison) -> list[tuple[str, ...]]:
    return [
        (s.label, s.kind, s.arm.first.policy, s.thresholds, s.r1.fmt(100), s.map_r.fmt(100),
         s.wall.fmt(digits=0), f"{len(s.arm.ok_runs)}/{len(s.arm.runs)}")
        for s in c.arms
    ]


def _minutes(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def summary_lines(c: Comparison) -> list[str]:
    """The verdict: best static arm, each learned arm's gap to it, and the compute of the grid."""
    lines = []
    best = c.best_static
    if best is None:
        lines.append("no finished static run: nothing to compare the dynamic arms with")
    else:
        lines.append(f"best static: {best.label} ({best.thresholds}): R@1 {best.r1.fmt(100)}, "
                     f"MAP@R {best.map_r.fmt(100)}, picked on the reported metric (the grid's oracle best)")
        lines.append(f"whole static grid ({sum(1 for s in c.arms if s.kind == 'static' and s.r1.n)} arms, one run each): "
                     f"{_minutes(c.grid_wall_s)} of wall time")
    for v in c.versus:
        paired = f"paired over {v.paired_seeds} seeds" if v.paired_seeds else "difference of the means"
        lines.append(
            f"dynamic {v.arm.label}: R@1 {v.arm.r1.fmt(100)}, gap {v.r1_gap.fmt(100, sign=True)} points "
            f"(MAP@R {v.map_gap.fmt(100, sign=True)}; {paired}); one run {v.arm.wall.fmt(digits=0)} s, "
            f"the whole grid costs {v.compute_ratio:.1f}x that"
        )
    lines.append(f"sweep: {c.num_runs} runs, {len(c.failed)} failed, {_minutes(c.total_wall_s)} of run wall time")
    return lines


def text_report(c: Comparison) -> str:
    rows = [HEADER, *_rows(c)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    out = [f"sweep {c.sweep}", "", *table, "", *summary_lines(c)]
    if c.failed:
        out += ["", "failed runs:"] + [f"  {r.path.name} ({' '.join(r.overrides)}): {r.error}" for r in c.failed]
    return "\n".join(out)


def markdown_report(c: Comparison, plots: list[Path], out_dir: Path) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# Static grid versus learned thresholds: `{c.sweep.name}`", "",
             f"Sweep `{c.sweep}`; test metrics of each run's best checkpoint in %, mean ± std over seeds.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in _rows(c)]
    lines += ["", *(f"- {line}" for line in summary_lines(c))]
    if c.failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.path.name}` (`{' '.join(r.overrides)}`): {cell(r.error or '')}" for r in c.failed]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out_dir)})" for p in plots]
    return "\n".join(lines) + "\n"
