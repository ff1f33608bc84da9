"""Compare the arms of a sweep: ``python -m ddtas_lightning.compare [DIR ...] [--out OUT] [--wandb]``
(= ``make compare``).

Each DIR is a Hydra sweep dir (``multirun/<task_name>/<date>_<time>``) or a task's multirun dir, which
means its latest sweep (default ``multirun/threshold_grid``: the latest ``make sweep``). A sweep made by
``hparams_search=...`` (Optuna TPE, ``optuna.json`` in its dir) is read as one family of trials; the
runs of the other sweeps are grouped into arms (same overrides apart from ``seed``). The headline is
the grid search chosen on *validation* (per seed), with every dynamic arm's paired difference to it
(95% interval, verdict) and the compute in CPU seconds and passes; the oracle test pick is a second,
labelled line. Writes PNG plots and ``report.md`` to OUT (default ``<first sweep>/report``);
``--wandb`` also logs the tables and plots to one summary run in the sweep's W&B group. Failed runs are
reported (with their ``error:`` line), runs of another dataset / backbone / run length are left out
and listed; a directory that is not a sweep stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddtas_lightning.report.render import markdown_report, text_report
from ddtas_lightning.report.runs import (
    SweepError,
    find_sweep,
    group_arms,
    is_optuna_sweep,
    load_optuna,
    load_sweep,
)
from ddtas_lightning.report.summary import OptunaFamily, comparable, compare
from ddtas_lightning.runtime.atomic_output import describe_os_error, staged_outputs

DEFAULT_DIR = Path("multirun/threshold_grid")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ddtas_lightning.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="*", type=Path, default=[DEFAULT_DIR],
                        help=f"sweep dirs, or a task's multirun dir for its latest sweep (default {DEFAULT_DIR}); "
                             "an Optuna sweep (hparams_search=...) is read as one family")
    parser.add_argument("--out", type=Path, default=None, help="where to write the plots and report.md "
                        "(default <first sweep>/report)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables and plots to one W&B "
                        "summary run in the sweep's group (offline unless an API key is configured)")
    return parser.parse_args(argv)


def _writable_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"--out {out_dir}: cannot write there ({exc.strerror or exc}); choose a writable "
                         "directory") from None
    return out_dir


def load(sweep_args: list[Path]):
    """The grid/arm runs and the Optuna families of the given sweeps."""
    sweeps = [find_sweep(p) for p in sweep_args]
    runs, families = [], []
    for sweep in sweeps:
        if is_optuna_sweep(sweep):
            study, trials = load_optuna(sweep)
            families.append(OptunaFamily(sweep, study.get("seed"), trials, str(study.get("sampler") or "TPE")))
        else:
            runs += load_sweep(sweep)
    return sweeps, runs, families


def run(sweep_args: list[Path], out: Path | None = None, use_wandb: bool = False) -> int:
    sweeps, runs, families = load(sweep_args)
    every = runs + [t for f in families for t in f.trials]
    if not every:
        raise SweepError(f"{', '.join(map(str, sweeps))}: no runs to compare")
    kept, excluded = comparable(every)
    kept_ids = {id(r) for r in kept}
    arm_runs = [r for r in runs if id(r) in kept_ids]
    for family in families:
        family.trials = [t for t in family.trials if id(t) in kept_ids]
    if not arm_runs and not families:
        raise SweepError("no comparable runs")
    comparison = compare(sweeps[0], group_arms(arm_runs) if arm_runs else [], families, excluded)
    print(text_report(comparison))
    if not any(r.ok for r in every):
        raise SweepError(f"none of the {len(every)} runs in {', '.join(map(str, sweeps))} finished (no metrics.json): "
                         "nothing to compare")
    out_dir = _writable_dir(out or sweeps[0] / "report")
    try:
        from ddtas_lightning.report.plots import write_plots
    except ImportError as exc:  # matplotlib is optional: the table and report.md do not need it
        print(f"warning: no plots ({exc}); `pip install matplotlib` for them", file=sys.stderr)
        write_plots = None
    try:  # staged and moved into place together: a full disk leaves no 0-byte report.md (runtime/atomic_output.py)
        with staged_outputs(out_dir, last=("report.md",)) as staging:
            staged = write_plots(comparison, staging) if write_plots is not None else []
            (staging / "report.md").write_text(markdown_report(comparison, staged, staging))
    except OSError as exc:
        raise SweepError(f"--out {out_dir}: cannot write the report there ({describe_os_error(exc)}); nothing was "
                         "kept. Free space or choose a writable directory") from None
    plots = [out_dir / p.name for p in staged]
    report = out_dir / "report.md"
    print(f"\nreport: {report}" + "".join(f"\nplot:   {p}" for p in plots))
    if use_wandb:
        from ddtas_lightning.report.wandb_summary import log_comparison

        where = log_comparison(comparison, plots, out_dir)
        print(f"wandb:  {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args.sweeps, args.out, args.wandb)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
