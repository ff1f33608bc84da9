"""`python -m ddtas_lightning.compare` on hand-made sweep dirs (no training): arms, mean +- std over
seeds; the headline is the grid point chosen on validation (here not the test-best point, which is shown
as the labelled oracle); paired differences with scipy-checked t intervals and verdicts (better,
indistinguishable, worse); the bootstrap column with per-query files; compute in CPU seconds and passes;
an Optuna family read at the compute of one learned run; test-set selection flagged; runs of another
dataset left out; malformed metrics.json and failed runs reported with their reason, not fatal; an empty,
missing or non-sweep directory, or an unwritable --out, stops with one error line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from ddtas_lightning.compare import load, main
from ddtas_lightning.report.runs import find_sweep, group_arms, load_sweep
from ddtas_lightning.report.summary import compare

REPO = Path(__file__).resolve().parents[1]
STATIC = "ddtas_lightning.policies.StaticThreshold"
META = "ddtas_lightning.policies.MetaThreshold"
ASMS = "ddtas_lightning.miners.asms.ASMS"
AT_ASMS = "ddtas_lightning.miners.at_asms.AdaptiveToleranceASMS"
STEPS = 5


def make_run(sweep: Path, num: int, arm: str, seed: int, *, r1: float | None, val: float | None = None,
             wall: float = 10.0, cpu: float | None = None, policy: str = STATIC, miner: str = ASMS,
             lam: float = 0.7, margin: float = 0.1, lambdas: list[float] | None = None,
             selection: str = "val", dataset: str = "synthetic", per_query: list[float] | None = None,
             overrides: list[str] | None = None, loss: str = "SoftContrastiveLoss",
             untrained: float | None = None) -> Path:
    """One job dir as train.py and Hydra leave it; ``r1=None``: a run that failed before metrics.json."""
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    overrides = overrides or [f"arm={arm}", f"seed={seed}", "experiment=threshold_grid"]
    config = {"seed": seed, "loss": {"threshold": lam}, "miner": {"_target_": miner, "margin": margin},
              "threshold_policy": {"_target_": policy}, "paths": {"output_dir": "${hydra:runtime.output_dir}"},
              "dataset": {"name": dataset}, "backbone": {"model_name": "resnet18"}, "trainer": {"max_epochs": 2}}
    choices = {"threshold_policy": "static" if policy == STATIC else "meta",
               "miner": "asms" if miner == ASMS else "at_asms", "arm": arm}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if r1 is None:
        (run / "train.log").write_text("[INFO] - data: train 1280 images\n"
                                       "[ERROR] - error: data.K=1 must be >= 2\n")
        return run
    lambdas = lambdas or [lam] * STEPS
    rows = ["step,train/lambda,mining/ratio,mining/tolerance,mining/gamma_pos,mining/gamma_neg,val/R@1"]
    for step, value in enumerate(lambdas):
        mining = "2.0,0.44,0.144,0.0056" if miner == AT_ASMS else ",,,"
        rows.append(f"{step},{value},{mining},")
    rows.append(f"{STEPS - 1},,,,,,{r1}")  # a validation row: no per-step values
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    val = r1 if val is None else val
    metrics = {"seed": seed, "overrides": overrides, "wall_time_s": wall, "train_time_s": wall - 1,
               "loss_threshold": lam, "test": {"test/R@1": r1, "test/MAP@R": r1 / 4}, "selection": selection,
               "best_val_R@1": val, "val_at_best": {"val/R@1": val, "val/MAP@R": val / 4},
               "compute": {"fit_cpu_s": wall if cpu is None else cpu, "fit_gpu_s": None,
                           "passes": {"train": {"forward_images": 800, "backward_images": 800}}},
               "choices": {"threshold_policy": policy.rsplit(".", 1)[-1], "miner": miner.rsplit(".", 1)[-1],
                           "dataset": dataset, "backbone": "resnet18", "loss": loss}}
    if untrained is not None:
        metrics["untrained"] = {"untrained/R@1": untrained, "untrained/MAP@R": untrained / 4}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if per_query is not None:
        np.savez(run / "per_query_test.npz", ids=np.arange(len(per_query)), **{
            "R@1": np.asarray(per_query, dtype=float), "MAP@R": np.asarray(per_query, dtype=float) / 4})
    return run


# arm -> (per-seed test R@1, per-seed validation R@1, CPU s per run, run settings). The validation pick
# (every seed) is lambda_0.7; the oracle test pick is lambda_0.5: they differ on purpose.
ARMS = {
    "lambda_0.3": ([0.30, 0.32, 0.31], [0.50, 0.52, 0.49], 10.0, {"lam": 0.3}),
    "lambda_0.5": ([0.44, 0.46, 0.45], [0.40, 0.41, 0.42], 10.0, {"lam": 0.5}),
    "lambda_0.7": ([0.35, 0.33, 0.34], [0.55, 0.56, 0.54], 10.0, {"lam": 0.7}),
    "margin_0.2": ([0.20, 0.22, 0.21], [0.30, 0.31, 0.32], 10.0, {"lam": 0.7, "margin": 0.2}),
    "at_asms": ([0.36, 0.32, 0.35], None, 12.0, {"miner": AT_ASMS}),
    "meta": ([0.41, 0.45, 0.43], None, 20.0, {"policy": META, "lambdas": [0.7, 0.66, 0.62, 0.6, 0.58]}),
    "mmsi": ([0.10, 0.11, 0.12], None, 25.0, {"policy": META}),
}


def make_sweep(root: Path, failed: bool = True, per_query: bool = False) -> Path:
    sweep = root / "multirun" / "threshold_grid" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    rng = np.random.default_rng(0)
    for arm, (r1s, vals, cpu, kw) in ARMS.items():
        for seed, r1 in enumerate(r1s):
            pq = (rng.random(40) < r1).astype(float) if per_query else None
            make_run(sweep, num, arm, seed, r1=r1, val=None if vals is None else vals[seed], cpu=cpu,
                     wall=cpu, per_query=pq, **kw)
            num += 1
    if failed:
        make_run(sweep, num, "meta", 3, r1=None, policy=META)
    return sweep


def test_arms_group_the_seeds_and_keep_the_sweep_order(tmp_path):
    arms = group_arms(load_sweep(make_sweep(tmp_path)))
    assert [a.label for a in arms] == list(ARMS)
    meta = arms[5]
    assert len(meta.runs) == 4 and len(meta.ok_runs) == 3 and len(meta.failed_runs) == 1
    assert [a.kind for a in arms] == ["static"] * 4 + ["dynamic"] * 3


def test_headline_is_the_validation_pick_with_paired_intervals_and_verdicts(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    # The grid search chosen on validation: lambda_0.7 at every seed (val 55/56/54), test 34.0 +- 1.0; the
    # oracle (best mean *test* R@1) is lambda_0.5, reported as such, not as the headline.
    assert ("grid search, chosen on validation per seed (headline): lambda_0.7: test R@1 34.0 ± 1.0, "
            "MAP@R 8.5 ± 0.2 (3 seeds; picking costs 4 runs, 40 CPU s)") in out
    assert "grid point chosen on validation, seed mean: lambda_0.7:" in out
    assert "oracle: grid point chosen on the TEST metric it reports (optimistic; not a result): lambda_0.5: " \
           "test R@1 45.0 ± 1.0" in out
    # meta - lambda_0.7 by seed: +6, +12, +9 points -> mean 9.0, t interval from scipy's t test
    for arm, r1s, expected in (("meta", ARMS["meta"][0], "better"), ("at_asms", ARMS["at_asms"][0], "indistinguishable"),
                               ("mmsi", ARMS["mmsi"][0], "worse")):
        diffs = [a - b for a, b in zip(r1s, ARMS["lambda_0.7"][0])]
        ci = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        expect = f"dynamic {arm}: ΔR@1 {100 * np.mean(diffs):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] points, {expected};"
        assert expect in out, (expect, out)
    # compute in CPU seconds: the grid (4 points x 10 s) per seed against one run of the arm
    assert "one run 20 ± 0 CPU s, the grid costs 2.0x that per seed" in out
    assert "one run 12 ± 0 CPU s, the grid costs 3.3x that per seed" in out
    assert "1.6k img" in out  # passes per run (forward + backward images)
    # the learned lambda (start -> end over seeds) and AT-ASMS's mean margins in the thresholds column
    assert "λ 0.70→0.58" in out and "m 0.10 adaptive (γ+ 0.144, γ- 0.006)" in out
    # the failed run is reported with its overrides and the error: line of its log, not fatal
    assert "failed runs:" in out and "arm=meta seed=3" in out and "error: data.K=1 must be >= 2" in out
    assert "sweep: 22 runs, 1 failed" in out and "WARNING" not in out

    report = sweep / "report"
    for name in ("r1_vs_threshold.png", "lambda_curves.png", "at_asms_curves.png", "quality_vs_compute.png",
                 "val_vs_test.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (report / "report.md").read_text()
    assert "| lambda_0.5 | static |" in md and "## Failed runs" in md and "](quality_vs_compute.png)" in md
    assert "## Dynamic arms against the validation-chosen grid" in md


def test_per_seed_pick_can_differ_between_seeds(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    # seed 0 validates lambda_0.3 best, seed 1 lambda_0.5
    for num, (arm, seed, r1, val, lam) in enumerate([("lambda_0.3", 0, 0.30, 0.6, 0.3), ("lambda_0.3", 1, 0.31, 0.4, 0.3),
                                                     ("lambda_0.5", 0, 0.40, 0.5, 0.5), ("lambda_0.5", 1, 0.42, 0.5, 0.5)]):
        make_run(sweep, num, arm, seed, r1=r1, val=val, lam=lam)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    # seed 0: lambda_0.3 (test 0.30), seed 1: lambda_0.5 (test 0.42); the seed-mean validation tie -> the first
    assert "(headline): lambda_0.3 / lambda_0.5: test R@1 36.0 ± 8.5" in out
    assert "grid point chosen on validation, seed mean: lambda_0.3:" in out


def test_bootstrap_over_seeds_and_queries_when_runs_saved_per_query_results(tmp_path, capsys):
    sweep = make_sweep(tmp_path, failed=False, per_query=True)
    comparison = compare(sweep, group_arms(load_sweep(sweep)))
    meta = next(v for v in comparison.versus if v.arm.label == "meta")
    assert meta.r1_boot is not None and meta.r1_boot.method == "bootstrap" and meta.r1_boot.n == 3
    assert meta.r1_boot.low <= meta.r1_boot.mean <= meta.r1_boot.high
    assert main([str(sweep)]) == 0
    assert "n/a (no per-query files)" not in capsys.readouterr().out
    no_files = compare(make_sweep(tmp_path / "b", failed=False), group_arms(load_sweep(make_sweep(tmp_path / "c", failed=False))))
    assert all(v.r1_boot is None for v in no_files.versus)


def test_test_set_selection_is_flagged(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_run(sweep, 0, "lambda_0.3", 0, r1=0.3, lam=0.3, selection="test")
    make_run(sweep, 1, "meta", 0, r1=0.3, policy=META)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: 1 of the runs chose their checkpoints on the TEST classes (data.selection=test" in out
    assert "**WARNING" in (sweep / "report" / "report.md").read_text()


def test_runs_of_another_dataset_are_left_out_and_listed(tmp_path, capsys):
    sweep = make_sweep(tmp_path, failed=False)
    make_run(sweep, 99, "lambda_0.9", 0, r1=0.99, lam=0.9, dataset="folder")  # would be the "best"
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "left out (not comparable):" in out and "99: not comparable: dataset 'folder' (the sweep's: 'synthetic')" in out
    assert "lambda_0.9" not in out.split("left out")[0]


@pytest.mark.parametrize("content, reason", [
    ("[1, 2]", "metrics.json malformed: expected a JSON object (train.py writes one), got a list"),
    (json.dumps({"wall_time_s": "slow"}), "metrics.json malformed: wall_time_s is 'slow', expected a number"),
    (json.dumps({"test": {"test/R@1": "high"}}), "metrics.json malformed: test.test/R@1 is 'high', expected a number"),
])
def test_malformed_metrics_json_is_a_failed_run_with_the_reason(tmp_path, capsys, content, reason):
    sweep = make_sweep(tmp_path, failed=False)
    bad = make_run(sweep, 99, "lambda_0.9", 0, r1=0.5, lam=0.9)
    (bad / "metrics.json").write_text(content)
    assert main([str(sweep)]) == 0
    assert reason in capsys.readouterr().out


def test_out_dir_that_cannot_be_written_is_one_error_line(tmp_path, capsys):
    sweep = make_sweep(tmp_path, failed=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([str(sweep), "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {blocker / 'report'}: cannot write there"), err


def make_optuna_sweep(root: Path, seed: int, trials: list[tuple[float, float, float]]) -> Path:
    """trials: (validation R@1, test R@1, CPU s) in trial order."""
    sweep = root / "multirun" / "threshold_tpe" / f"2026-01-02_00-00-0{seed}"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    record = []
    for num, (val, r1, cpu) in enumerate(trials):
        lam = 0.2 + 0.1 * num
        make_run(sweep, num, "lambda_0.7", seed, r1=r1, val=val, cpu=cpu, lam=lam,
                 overrides=["hparams_search=threshold_tpe", f"loss.threshold={lam}", f"seed={seed}"])
        record.append({"number": num, "params": {"loss.threshold": lam}, "value": val, "state": "COMPLETE"})
    (sweep / "optuna.json").write_text(json.dumps({"seed": seed, "sampler": "TPE", "trials": record}))
    return sweep


def test_optuna_sweep_is_one_family_read_at_the_compute_of_a_learned_run(tmp_path, capsys):
    grid = make_sweep(tmp_path, failed=False)
    # cumulative CPU: 10, 20, 30; the validation-best so far: trial 0, then 1 (val 0.6), then still 1
    families = [make_optuna_sweep(tmp_path, s, [(0.5, 0.30, 10.0), (0.6, 0.40 + 0.01 * s, 10.0), (0.55, 0.5, 10.0)])
                for s in range(3)]
    assert main([str(grid), *map(str, families)]) == 0
    out = capsys.readouterr().out
    assert "TPE 2026-01-02_00-00-00 (seed 0): 3 trials, 30 CPU s; validation-best trial 1 (λ 0.300" in out
    # one meta run costs 20 CPU s: TPE has finished trials 0 and 1 by then -> trial 1 (test 0.40)
    assert "at the compute of one meta run (20 CPU s): test R@1 40.0 (1)" in out
    # paired by seed: meta (41, 45, 43) - TPE at 20 s (40, 41, 42) = (+1, +4, +1)
    diffs = [0.41 - 0.40, 0.45 - 0.41, 0.43 - 0.42]
    ci = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert f"meta vs TPE at equal compute: ΔR@1 {100 * np.mean(diffs):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] over 3 seed(s)" in out
    assert (grid / "report" / "tpe_best_so_far.png").is_file()


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
        make_run(sweep, num, "x", seed, r1=0.3, lam=lam,
                 overrides=[f"loss.threshold={lam}", f"seed={seed}", "trainer.max_epochs=2"])
    assert [a.label for a in group_arms(load_sweep(sweep))] == ["threshold=0.3", "threshold=0.5"]


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


def test_wandb_summary_run_logs_the_tables_and_plots_offline_in_the_sweeps_group(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    seen = {}
    real_init = wandb.init

    def spy(**kwargs):
        seen.update(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    sweep = make_sweep(tmp_path, failed=False)
    assert main([str(sweep), "--wandb"]) == 0
    assert seen["group"] == f"threshold_grid-{sweep.name}" and seen["job_type"] == "compare"
    (run_dir,) = (sweep / "report" / "wandb").glob("offline-run-*")
    tables = {p.name.split("_0_")[0]: json.loads(p.read_text()) for p in run_dir.glob("files/media/table/*.table.json")}
    assert set(tables) == {"arms", "dynamic_vs_grid"}
    assert [row[0] for row in tables["arms"]["data"]] == list(ARMS)
    assert [row[0] for row in tables["dynamic_vs_grid"]["data"]] == ["at_asms", "meta", "mmsi"]
    images = {p.name.split("_0_")[0] for p in run_dir.glob("files/media/images/plots/*.png")}
    assert {"quality_vs_compute", "val_vs_test", "r1_vs_threshold"} <= images


def test_a_pruned_study_is_one_family_and_its_pruned_trials_compute_counts(tmp_path, capsys):
    """hydra.sweeper.pruner: a pruned trial's metrics.json records its compute and validations but no test
    metrics; the family counts its CPU seconds and never picks it (its validation R@1 is of a stopped run)."""
    grid = make_sweep(tmp_path, failed=False)
    sweep = make_optuna_sweep(tmp_path, 0, [(0.5, 0.30, 10.0), (0.6, 0.40, 10.0), (0.55, 0.5, 10.0)])
    metrics_path = sweep / "1" / "metrics.json"
    pruned = json.loads(metrics_path.read_text())
    pruned.update(status="pruned", pruned={"at_validation": 1})
    pruned.pop("test")
    pruned["compute"]["fit_cpu_s"] = 4.0
    metrics_path.write_text(json.dumps(pruned))
    study = json.loads((sweep / "optuna.json").read_text())
    study["sampler"] = "Grid"
    study["trials"][1]["state"] = "PRUNED"
    (sweep / "optuna.json").write_text(json.dumps(study))

    _, _, (family,) = load([sweep])
    assert [t.path.name for t in family.pruned] == ["1"] and family.name == "Grid + pruning"
    # after trial 0: 10 s, best 0; trial 1 (pruned) adds 4 s, the best stays 0; trial 2: 24 s, best 2
    assert [(spent, run.path.name) for spent, _, _, run in family.best_so_far()] == [(10.0, "0"), (14.0, "0"),
                                                                                      (24.0, "2")]
    assert main([str(grid), str(sweep)]) == 0
    out = capsys.readouterr().out
    assert ("Grid + pruning 2026-01-02_00-00-00 (seed 0): 3 trials (1 pruned), 24 CPU s; validation-best trial 2 "
            "(λ 0.400") in out


def test_arm_labels_are_the_distinguishing_overrides_abbreviated(tmp_path):
    sweep = tmp_path / "sweep"
    long_path = "backbone.checkpoint_path=/data/weights/resnet18_imagenet_v2.pth"
    runs = [["loss.threshold=0.3", "miner.margin=0.1", long_path], ["loss.threshold=0.3", "miner.margin=0.2", long_path],
            ["loss.threshold=0.3", "miner.margin=0.1", "threshold_policy.threshold=0.4"]]
    for num, overrides in enumerate(runs):
        make_run(sweep, num, "x", 0, r1=0.3, overrides=[*overrides, "seed=0"])
    labels = [a.label for a in group_arms(load_sweep(sweep))]
    # loss.threshold is common to all (dropped); keys lose their group; a long value is cut
    assert labels == ["margin=0.1 checkpoint_path=/data/weights…", "margin=0.2 checkpoint_path=/data/weights…",
                      "margin=0.1 threshold=0.4"], labels
    # two varying keys with the same last part keep their groups
    sweep2 = tmp_path / "sweep2"
    for num, overrides in enumerate([["loss.threshold=0.3", "threshold_policy.threshold=0.4"],
                                     ["loss.threshold=0.5", "threshold_policy.threshold=0.6"]]):
        make_run(sweep2, num, "x", 0, r1=0.3, overrides=[*overrides, "seed=0"])
    assert [a.label for a in group_arms(load_sweep(sweep2))] == [
        "loss.threshold=0.3 threshold_policy.threshold=0.4", "loss.threshold=0.5 threshold_policy.threshold=0.6"]


def test_a_dir_of_single_runs_is_not_a_sweep(tmp_path, capsys):
    # `compare outputs/train`: single runs (hydra.mode RUN, dated dirs), each maybe another loss
    outputs = tmp_path / "outputs" / "train"
    for name, loss in (("2026-01-01_10-00-00-000001", "MultiSimilarityLoss"), ("2026-01-01_11-00-00-000002", "TripletMarginLoss")):
        run = make_run(outputs, 0, "x", 0, r1=0.3, loss=loss)
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "RUN", "runtime": {"choices": {}}}}))
        run.rename(outputs / name)
    assert main([str(outputs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds single runs (2, e.g. 2026-01-01_10-00-00-000001), not a sweep" in err[0]
    assert "multirun/<task_name>/<date>_<time>" in err[0] and "make sweep" in err[0]


def test_runs_of_another_loss_are_left_out_not_made_grid_points(tmp_path, capsys):
    sweep = make_sweep(tmp_path, failed=False)
    make_run(sweep, 98, "nspa", 0, r1=0.95, val=0.99, lam=0.4, loss="TripletMarginLoss")  # would be the headline
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "98: not comparable: loss 'TripletMarginLoss' (the sweep's: 'SoftContrastiveLoss')" in out
    assert "(headline): lambda_0.7:" in out


def test_one_seed_reads_n_a_and_singular_without_scipy_warnings(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for num, (arm, lam, r1) in enumerate([("lambda_0.3", 0.3, 0.30), ("lambda_0.5", 0.5, 0.40), ("lambda_0.7", 0.7, 0.35)]):
        make_run(sweep, num, arm, 0, r1=r1, val=0.5, lam=lam)  # one seed, every validation R@1 equal
    make_run(sweep, 3, "meta", 0, r1=0.41, val=0.5, policy=META, lambdas=[0.7, 0.6, 0.6, 0.6, 0.6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning (or any other) fails the test
        assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 seeds" not in out and "(1 seed; picking costs 3 runs" in out and "paired over 1 seed vs" in out
    from ddtas_lightning.report.plots import spearman_text

    assert spearman_text([50.0, 50.0, 50.0, 50.0], [30.0, 40.0, 35.0, 41.0], seeds=1) == \
        "n/a (1 seed, validation R@1 constant)"
    assert spearman_text([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], seeds=3) == "= 0.50"
