"""``compare --wandb``: the comparison itself on the W&B dashboard, as one summary run in the sweep's
group (``<task_name>-<sweep dir name>``, the group ``logger=wandb`` gives the sweep's training runs),
job type ``compare``, tagged ``comparison``: the arms table and the dynamic-vs-grid table as
``wandb.Table`` s, the headline numbers in the run summary, and every plot as an image. Offline unless an
API key is configured, like the training runs (ddtas_lightning/report/wandb_logger.py's rule), written to
``<out dir>/wandb/``; ``WANDB_MODE`` wins.
"""

from __future__ import annotations

import math
from pathlib import Path

from ddtas_lightning.report.render import ARM_HEADER, VERSUS_HEADER, arm_rows, versus_rows
from ddtas_lightning.report.summary import Comparison
from ddtas_lightning.report.wandb_logger import resolve_mode


def sweep_group(c: Comparison) -> str:
    """The W&B group of the sweep's training runs: ``<task_name>-<sweep dir name>``."""
    task = next((r.metrics.get("task_name") for a in c.arms for r in a.arm.ok_runs if r.metrics.get("task_name")),
                None) or c.sweep.parent.name
    return f"{task}-{c.sweep.name}"


def headline_summary(c: Comparison) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    if c.headline is not None:
        out["grid_val_pick/arms"] = c.headline.label()
        out["grid_val_pick/test_R@1"] = c.headline.metric("R@1").mean
        out["grid_val_pick/test_MAP@R"] = c.headline.metric("MAP@R").mean
        out["grid_val_pick/cpu_s"] = c.headline.cost_cpu_s
    if c.oracle is not None:
        out["grid_oracle_test_pick/test_R@1"] = c.oracle.metric("R@1").mean
    for v in c.versus:
        out[f"{v.arm.label}/delta_R@1"] = v.r1.mean
        out[f"{v.arm.label}/delta_R@1_low"] = v.r1.low
        out[f"{v.arm.label}/delta_R@1_high"] = v.r1.high
        out[f"{v.arm.label}/verdict"] = v.r1.verdict
        out[f"{v.arm.label}/compute_ratio"] = v.compute_ratio
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def log_comparison(c: Comparison, plots: list[Path], out_dir: Path, mode: str | None = None,
                   project: str = "ddtas-lightning") -> str:
    """Log the comparison; returns where it went (the run's URL online, its directory offline)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    run = wandb.init(project=project, group=sweep_group(c), job_type="compare", name=f"compare-{c.sweep.name}",
                     tags=["comparison"], dir=str(out_dir), mode=resolve_mode(mode),  # any run was finished above
                     config={"sweep": str(c.sweep), "optuna_sweeps": [str(f.sweep) for f in c.optuna]})
    try:
        run.log({"arms": wandb.Table(columns=list(ARM_HEADER), data=[list(r) for r in arm_rows(c)]),
                 "dynamic_vs_grid": wandb.Table(columns=list(VERSUS_HEADER), data=[list(r) for r in versus_rows(c)]),
                 **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        run.summary.update(headline_summary(c))
        where = run.url if run.url else str(Path(run.dir).parent)
    finally:
        run.finish()
    return where
