"""`python -m ddtas_lightning.compare` on hand-made sweep dirs (no training): arms, mean +- std over
seeds, best static vs learned, paired gaps, compute ratio, plots and report.md; a failed run is reported,
not fatal; an empty, missing or non-sweep directory stops with one clear error line and exit code 2."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddtas_lightning.compare import main
from ddtas_lightning.report.runs import find_sweep, group_arms, load_sweep

REPO = Path(__file__).resolve().parents[1]
STATIC = "ddtas_lightning.policies.StaticThreshold"
META = "ddtas_lightning.policies.MetaThreshold"
ASMS = "ddtas_lightning.miners.asms.ASMS"
AT_ASMS = "ddtas_lightning.miners.at_asms.AdaptiveToleranceASMS"
STEPS = 5


def make_run(sweep: Path, num: int, arm: str, seed: int, *, r1: float | None, wall: float = 10.0,
             policy: str = STATIC, miner: str = ASMS, lam: float = 0.7, margin: float = 0.1,
             lambdas: list[float] | None = None) -> Path:
    """One job dir as train.py and Hydra leave it; ``r1=None``: a run that failed before metrics.json."""
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    overrides = [f"arm={arm}", f"seed={seed}", "experiment=threshold_grid"]
    config = {"seed": seed, "loss": {"threshold": lam}, "miner": {"_target_": miner, "margin": margin},
              "threshold_policy": {"_target_": policy}, "paths": {"output_dir": "${hydra:runtime.output_dir}"}}
    choices = {"threshold_policy": "static" if policy == STATIC else "meta",
               "miner": "asms" if miner == ASMS else "at_asms", "arm": arm}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if r1 is None:
        (run / "train.log").write_text("[INFO] - data: train 1280 images\nRuntimeError: CUDA out of memory\n")
        return run
    lambdas = lambdas or [lam] * STEPS
    rows = ["step,train/lambda,mining/ratio,mining/tolerance,mining/gamma_pos,mining/gamma_neg,val/R@1"]
    for step, value in enumerate(lambdas):
        mining = "2.0,0.44,0.144,0.0056" if miner == AT_ASMS else ",,,"
        rows.append(f"{step},{value},{mining},")
    rows.append(f"{STEPS - 1},,,,,,{r1}")  # a validation row: no per-step values
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    metrics = {"seed": seed, "overrides": overrides, "wall_time_s": wall, "train_time_s": wall - 1,
               "loss_threshold": lam, "test": {"test/R@1": r1, "test/MAP@R": r1 / 4},
               "choices": {"threshold_policy": policy.rsplit(".", 1)[-1], "miner": miner.rsplit(".", 1)[-1]}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


# arm -> (per-seed R@1, wall time, run settings)
ARMS = {
    "lambda_0.3": ([0.30, 0.32], 10.0, {"lam": 0.3}),
    "lambda_0.5": ([0.40, 0.44], 10.0, {"lam": 0.5}),
    "lambda_0.7": ([0.35, 0.33], 10.0, {"lam": 0.7}),
    "margin_0.2": ([0.20, 0.22], 10.0, {"lam": 0.7, "margin": 0.2}),
    "at_asms": ([0.38, 0.36], 12.0, {"miner": AT_ASMS}),
    "meta": ([0.41, 0.47], 20.0, {"policy": META, "lambdas": [0.7, 0.66, 0.62, 0.6, 0.58]}),
}


def make_sweep(root: Path, failed: bool = True) -> Path:
    sweep = root / "multirun" / "threshold_grid" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for arm, (r1s, wall, kw) in ARMS.items():
        for seed, r1 in enumerate(r1s):
            make_run(sweep, num, arm, seed, r1=r1, wall=wall, **kw)
            num += 1
    if failed:
        make_run(sweep, num, "meta", 2, r1=None, policy=META)
    return sweep


def test_arms_group_the_seeds_and_keep_the_sweep_order(tmp_path):
    arms = group_arms(load_sweep(make_sweep(tmp_path)))
    assert [a.label for a in arms] == list(ARMS)
    meta = arms[-1]
    assert len(meta.runs) == 3 and len(meta.ok_runs) == 2 and len(meta.failed_runs) == 1
    assert [a.kind for a in arms] == ["static"] * 4 + ["dynamic"] * 2


def test_compare_reports_best_static_learned_gap_and_compute(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    # best static: lambda_0.5 (mean 42.0); meta's gap paired by seed: (41-40, 47-44) = +1, +3 -> 2.0 +- 1.4
    assert "best static: lambda_0.5 (λ 0.50, m 0.10): R@1 42.0 ± 2.8" in out
    gaps = [0.41 - 0.40, 0.47 - 0.44]
    assert f"gap +{100 * statistics.fmean(gaps):.1f} ± {100 * statistics.stdev(gaps):.1f} points" in out
    assert "paired over 2 seeds" in out
    # the whole static grid: 4 arms x 10 s = 40 s; one meta run 20 s -> 2.0x, one at_asms run 12 s -> 3.3x
    assert "whole static grid (4 arms, one run each): 40 s" in out
    assert "dynamic meta: R@1 44.0 ± 4.2" in out and "one run 20 ± 0 s, the whole grid costs 2.0x that" in out
    assert "one run 12 ± 0 s, the whole grid costs 3.3x that" in out
    # the learned lambda (start -> end over seeds) and AT-ASMS's mean margins in the thresholds column
    assert "λ 0.70→0.58" in out and "m 0.10 adaptive (γ+ 0.144, γ- 0.006)" in out
    # the failed run is reported with its overrides and the error line of its log, not fatal
    assert "failed runs:" in out and "arm=meta seed=2" in out and "CUDA out of memory" in out
    assert "sweep: 13 runs, 1 failed" in out

    report = sweep / "report"
    for name in ("r1_vs_threshold.png", "lambda_curves.png", "at_asms_curves.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (report / "report.md").read_text()
    assert "| lambda_0.5 | static |" in md and "## Failed runs" in md and "](r1_vs_threshold.png)" in md


def test_compare_a_task_dir_reads_its_latest_sweep(tmp_path, capsys):
    sweep = make_sweep(tmp_path, failed=False)
    older = sweep.parent / "2025-01-01_00-00-00"
    older.mkdir()
    (older / "multirun.yaml").write_text("hydra: {}\n")
    os.utime(older / "multirun.yaml", (0, 0))
    assert find_sweep(sweep.parent) == sweep
    assert main([str(sweep.parent), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file()
    assert "failed runs" not in capsys.readouterr().out


def test_generic_sweep_labels_arms_by_their_distinct_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    for num, (lam, seed) in enumerate([(0.3, 0), (0.3, 1), (0.5, 0), (0.5, 1)]):
        run = make_run(sweep, num, "x", seed, r1=0.3, lam=lam)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["overrides"] = [f"loss.threshold={lam}", f"seed={seed}", "trainer.max_epochs=2"]
        (run / "metrics.json").write_text(json.dumps(metrics))
    assert [a.label for a in group_arms(load_sweep(sweep))] == ["loss.threshold=0.3", "loss.threshold=0.5"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d.mkdir(), "is empty: no sweep to compare"),
        (lambda d: None, "does not exist (a sweep dir: multirun/<task_name>/<date>_<time>"),
        (lambda d: (d / "notes").mkdir(parents=True), "is not a Hydra sweep"),
        (lambda d: ((d / ".hydra").mkdir(parents=True), (d / "metrics.json").write_text("{}")),
         "is a single run, not a sweep"),
        (lambda d: (d.mkdir(), (d / "multirun.yaml").write_text("{}")), "holds no runs yet"),
        (lambda d: (d.mkdir(), (d / "multirun.yaml").write_text("{}"), make_run(d, 0, "a", 0, r1=None)),
         "none of the 1 runs"),
    ],
    ids=["empty", "missing", "not-a-sweep", "single-run", "no-jobs", "all-failed"],
)
def test_bad_directories_are_one_error_line_and_exit_code_2(tmp_path, capsys, setup, message):
    target = tmp_path / "d"
    setup(target)
    assert main([str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_on_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "ddtas_lightning.compare", str(tmp_path / "empty")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'empty'} is empty: no sweep to compare (start one with `make sweep`)"
