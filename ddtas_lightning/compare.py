"""Compare the arms of a sweep: ``python -m ddtas_lightning.compare [DIR] [--out OUT]`` (= ``make compare``).

DIR is a Hydra sweep dir (``multirun/<task_name>/<date>_<time>``) or a task's multirun dir, which means
its latest sweep (default ``multirun/threshold_grid``: the latest ``make sweep``). Reads every run's
``metrics.json``, overrides and per-step CSV log, groups the runs into arms (same overrides apart from
``seed``) and prints a table (policy, thresholds, R@1, MAP@R, wall time: mean +- std over seeds), the best
static arm, each dynamic arm's gap to it and the compute of the whole static grid against one dynamic
run. Writes PNG plots and ``report.md`` to OUT (default ``<sweep dir>/report``). Failed runs are
reported, not fatal; a directory that is not a sweep stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddtas_lightning.report.render import markdown_report, text_report
from ddtas_lightning.report.runs import SweepError, find_sweep, group_arms, load_sweep
from ddtas_lightning.report.summary import compare

DEFAULT_DIR = Path("multirun/threshold_grid")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ddtas_lightning.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", nargs="?", type=Path, default=DEFAULT_DIR,
                        help=f"sweep dir, or a task's multirun dir for its latest sweep (default {DEFAULT_DIR})")
    parser.add_argument("--out", type=Path, default=None, help="where to write the plots and report.md "
                        "(default <sweep dir>/report)")
    return parser.parse_args(argv)


def run(sweep_arg: Path, out: Path | None = None) -> int:
    sweep = find_sweep(sweep_arg)
    runs = load_sweep(sweep)
    comparison = compare(sweep, group_arms(runs))
    print(text_report(comparison))
    if len(comparison.failed) == len(runs):
        raise SweepError(f"none of the {len(runs)} runs in {sweep} finished (no metrics.json): nothing to compare")
    out_dir = out or sweep / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from ddtas_lightning.report.plots import write_plots
    except ImportError as exc:  # matplotlib is optional: the table and report.md do not need it
        print(f"warning: no plots ({exc}); `pip install matplotlib` for them", file=sys.stderr)
        plots = []
    else:
        plots = write_plots(comparison, out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown_report(comparison, plots, out_dir))
    print(f"\nreport: {report}" + "".join(f"\nplot:   {p}" for p in plots))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args.sweep, args.out)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
