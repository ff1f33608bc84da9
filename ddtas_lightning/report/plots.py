"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

* ``r1_vs_threshold.png``: test R@1 (mean +- std over seeds) against the static lambda (one line per
  fixed margin) and against the static miner margin (one line per fixed lambda), each dynamic arm drawn
  across the panel as a horizontal line with its +-std band;
* ``lambda_curves.png``: the learned lambda over training steps (thin: each seed; thick: their mean),
  the static grid's lambdas dotted;
* ``at_asms_curves.png``: AT-ASMS's ratio r, tolerance t and margins gamma+ / gamma- over steps (seed
  mean, moving average over 10 steps);
* ``quality_vs_compute.png``: test R@1 (mean with its 95% t interval over seeds) against training CPU
  seconds per run for every arm, the grid search chosen on validation at the grid's cost, and the
  Optuna TPE best-so-far curves;
* ``tpe_best_so_far.png``: per TPE study, the test R@1 of the validation-best trial so far against
  cumulative CPU seconds, each learned arm's CPU seconds per run marked;
* ``val_vs_test.png``: validation R@1 against test R@1 for every run (does the validation pick transfer?).
A plot without anything to show is not written.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from ddtas_lightning.report.stats import t_interval  # noqa: E402
from ddtas_lightning.report.summary import ArmSummary, Comparison, adapts_margin, learns_lambda  # noqa: E402

SMOOTH = 10  # steps of the moving average of the AT-ASMS curves


def _legend_below(ax, fontsize: float = 7) -> None:
    """The legend under the axes (saved with ``bbox_inches="tight"``), so long arm names never cover the
    data or run off the figure; two columns when there are many entries."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        height_in = ax.get_position().height * ax.figure.get_figheight()
        below = 0.7 / max(height_in, 0.5)  # clear of the tick labels and the x label: ~0.7 inch
        ax.legend(handles, labels, fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -below),
                  ncol=2 if len(labels) > 4 else 1, frameon=False)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legends below the axes included
    plt.close(fig)
    return path


def _colors(arms: list[ArmSummary]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {a.label: cycle[i % len(cycle)] for i, a in enumerate(arms)}


def _grid_lines(static: list[ArmSummary], x_of, fixed_of,
                min_points: int = 2) -> dict[float, list[tuple[float, ArmSummary]]]:
    """Static arms on a line per value of the *other* threshold, kept when it has ``min_points`` x values."""
    lines: dict[float, list[tuple[float, ArmSummary]]] = defaultdict(list)
    for s in static:
        x, fixed = x_of(s), fixed_of(s)
        if x is not None and fixed is not None and not math.isnan(s.r1.mean):
            lines[fixed].append((x, s))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items() if len({x for x, _ in v}) >= min_points}


def plot_r1_vs_threshold(c: Comparison, path: Path) -> Path | None:
    static = [s for s in c.arms if s.kind == "static"]
    dynamic = [s for s in c.arms if s.kind == "dynamic" and not math.isnan(s.r1.mean)]
    panels = [
        ("static loss threshold λ", _grid_lines(static, lambda s: s.arm.first.loss_threshold,
                                                lambda s: s.arm.first.margin), "m"),
        ("static miner margin m", _grid_lines(static, lambda s: s.arm.first.margin,
                                              lambda s: s.arm.first.loss_threshold), "λ"),
    ]
    panels = [p for p in panels if p[1]]
    if not panels:  # no grid line: the static points against lambda, still crossed by the dynamic runs
        points = _grid_lines(static, lambda s: s.arm.first.loss_threshold, lambda s: s.arm.first.margin, 1)
        if not points:
            return None
        panels = [("static loss threshold λ", points, "m")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    colors = _colors(dynamic)
    for ax, (xlabel, lines, fixed_name) in zip(axes[0], panels):
        for fixed, points in sorted(lines.items()):
            xs = [x for x, _ in points]
            ys = [100 * s.r1.mean for _, s in points]
            err = [0 if math.isnan(s.r1.std) else 100 * s.r1.std for _, s in points]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color="black",
                        label=f"static grid ({fixed_name} = {fixed:g})")
        for s in dynamic:
            mean = 100 * s.r1.mean
            ax.axhline(mean, color=colors[s.label], linestyle="--", label=f"{s.label} ({s.arm.first.policy})")
            if not math.isnan(s.r1.std):
                ax.axhspan(mean - 100 * s.r1.std, mean + 100 * s.r1.std, color=colors[s.label], alpha=0.12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test R@1 (%)")
        ax.grid(alpha=0.3)
        _legend_below(ax)
    fig.suptitle("Static grid (mean ± std over seeds) vs dynamic runs (dashed, ± std band)")
    return _save(fig, path)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8,
            which: str = "major", title_size: float | None = None) -> Path:
    """Label, grid, legend and save a single-axes figure; returns ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3, which=which)
    _legend_below(ax, legend_size)
    return _save(fig, path)


def _seed_mean(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, value in curve:
            by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def _smooth(values: list[float], window: int = SMOOTH) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_lambda_curves(c: Comparison, path: Path) -> Path | None:
    learned = [s for s in c.arms if learns_lambda(s.arm)]
    if not learned:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(learned)
    for lam in sorted({s.arm.first.loss_threshold for s in c.arms
                       if s.kind == "static" and s.arm.first.loss_threshold is not None}):
        ax.axhline(lam, color="grey", linestyle=":", linewidth=1)
    for s in learned:
        curves = [r.curves["train/lambda"] for r in s.arm.ok_runs if r.curves.get("train/lambda")]
        for curve in curves:
            ax.plot(*zip(*curve), color=colors[s.label], alpha=0.3, linewidth=0.8)
        ax.plot(*_seed_mean(curves), color=colors[s.label], linewidth=2, label=f"{s.label} (mean of {len(curves)})")
    if c.best_static is not None and c.best_static.arm.first.loss_threshold is not None:
        ax.axhline(c.best_static.arm.first.loss_threshold, color="black", linestyle=":", linewidth=1.5,
                   label=f"grid λ chosen on validation ({c.best_static.label})")
    return _finish(fig, ax, path, "training step", "λ (loss threshold)",
                   "Learned λ over training (dotted: the static grid)")


def plot_at_asms_curves(c: Comparison, path: Path) -> Path | None:
    adaptive = [s for s in c.arms if adapts_margin(s.arm)]
    if not adaptive:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = _colors(adaptive)
    for s in adaptive:
        runs = s.arm.ok_runs
        for ax, key in zip(axes[:2], ("mining/ratio", "mining/tolerance")):
            steps, mean = _seed_mean([r.curves.get(key, []) for r in runs])
            ax.plot(steps, _smooth(mean), color=colors[s.label], label=s.label)
        for key, style in (("mining/gamma_pos", "-"), ("mining/gamma_neg", "--")):
            steps, mean = _seed_mean([r.curves.get(key, []) for r in runs])
            sign = "+" if key.endswith("pos") else "-"
            axes[2].plot(steps, _smooth(mean), style, color=colors[s.label], label=f"{s.label} γ{sign}")
    for ax, title in zip(axes, ("ratio r = counted negatives / positives", "tolerance t",
                                "margins γ+ (solid), γ- (dashed)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        _legend_below(ax)
    fig.suptitle(f"AT-ASMS over training (mean over seeds, moving average of {SMOOTH} steps)")
    return _save(fig, path)


def _t_half(values: list[float]) -> float:
    iv = t_interval(values)
    return 0.0 if math.isnan(iv.low) else iv.half_width


def plot_quality_vs_compute(c: Comparison, path: Path) -> Path | None:
    arms = [s for s in c.arms if not math.isnan(s.cpu.mean) and s.r1.n]
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for s in arms:
        values = [100 * v for v in s.arm.values("R@1")]
        marker, color = ("o", "grey") if s.kind == "static" else ("s", None)
        ax.errorbar(s.cpu.mean, statistics.fmean(values), yerr=_t_half(values), fmt=marker, capsize=3,
                    color=color, label=None if s.kind == "static" else s.label)
        if s.kind == "static":
            ax.annotate(s.label, (s.cpu.mean, statistics.fmean(values)), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    head = c.headline
    if head is not None:
        values = [100 * v for v in head.values("R@1").values()]
        ax.errorbar(head.cost_cpu_s, statistics.fmean(values), yerr=_t_half(values), fmt="D", color="black",
                    capsize=3, label=f"grid search, val pick per seed ({head.runs_needed} runs)")
    for fam in c.optuna:
        curve = fam.best_so_far()
        if curve:
            ax.step([x for x, *_ in curve], [100 * t for _, _, t, _ in curve], where="post", alpha=0.7,
                    label=f"TPE best so far (seed {fam.seed})")
    ax.set_xscale("log")
    return _finish(fig, ax, path, "training CPU seconds (per run; the grid: all its points)",
                   "test R@1 (%), mean ± 95% t interval over seeds", "Quality against compute (grey: static grid points)",
                   legend_size=7, which="both")


def plot_tpe_best_so_far(c: Comparison, path: Path) -> Path | None:
    curves = [(fam, fam.best_so_far()) for fam in c.optuna]
    curves = [(f, cv) for f, cv in curves if cv]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam, curve in curves:
        ax.step([x for x, *_ in curve], [100 * t for _, _, t, _ in curve], where="post", marker="o",
                label=f"TPE seed {fam.seed}: test R@1 of the val-best trial")
    learned = [v.arm for v in c.versus if not math.isnan(v.arm.cpu.mean)]
    colors = _colors(learned)
    for s in learned:
        ax.axvline(s.cpu.mean, color=colors[s.label], linestyle="--", linewidth=1,
                   label=f"one {s.label} run ({s.cpu.mean:.0f} CPU s, R@1 {100 * s.r1.mean:.1f})")
    return _finish(fig, ax, path, "cumulative training CPU seconds of the study", "test R@1 (%)",
                   "Optuna TPE: best so far (chosen on validation) against compute", legend_size=7)


def plot_val_vs_test(c: Comparison, path: Path) -> Path | None:
    runs = [(r, kind) for s in c.arms for r, kind in ((r, s.kind) for r in s.arm.ok_runs)]
    runs += [(r, "tpe") for fam in c.optuna for r in fam.trials if r.ok]
    points = [(100 * r.val_metric("R@1"), 100 * r.metric("R@1"), kind) for r, kind in runs]
    points = [p for p in points if not (math.isnan(p[0]) or math.isnan(p[1]))]
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for kind, marker in (("static", "o"), ("dynamic", "s"), ("tpe", "^")):
        xs = [x for x, _, k in points if k == kind]
        ys = [y for _, y, k in points if k == kind]
        if xs:
            ax.scatter(xs, ys, marker=marker, alpha=0.7, label=kind)
    seeds = {r.seed for r, _ in runs if r.seed is not None}
    rho = spearman_text([x for x, _, _ in points], [y for _, y, _ in points], len(seeds))
    return _finish(fig, ax, path, "validation R@1 (%) of the selected checkpoint", "test R@1 (%)",
                   f"Does the validation pick transfer? Spearman ρ {rho} ({len(points)} runs)", title_size=9)


def spearman_text(xs: list[float], ys: list[float], seeds: int) -> str:
    """``= 0.83``, or ``n/a (...)`` and why: fewer than 3 points, or a side with one value (scipy would warn
    ConstantInputWarning and return NaN)."""
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return f"n/a ({len(xs)} runs)"
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        why = "1 seed, " if seeds == 1 else ""
        return f"n/a ({why}{'validation' if len(set(xs)) < 2 else 'test'} R@1 constant)"
    return f"= {spearmanr(xs, ys).statistic:.2f}" + (" (1 seed)" if seeds == 1 else "")


def write_plots(c: Comparison, out_dir: Path) -> list[Path]:
    """Every plot that has something to show, as PNG files in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [
        plot_r1_vs_threshold(c, out_dir / "r1_vs_threshold.png"),
        plot_lambda_curves(c, out_dir / "lambda_curves.png"),
        plot_at_asms_curves(c, out_dir / "at_asms_curves.png"),
        plot_quality_vs_compute(c, out_dir / "quality_vs_compute.png"),
        plot_tpe_best_so_far(c, out_dir / "tpe_best_so_far.png"),
        plot_val_vs_test(c, out_dir / "val_vs_test.png"),
    ]
    return [p for p in made if p is not None]
