"""The study report (python -m ddtas_lightning.study): per setting the validation-selected grid, each learned
arm x start against it (paired t interval), whether the grid is flat, the target verdict, and the ablation
table across settings; checked on hand-made run dirs with known numbers."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats as sps

from ddtas_lightning.report.runs import SweepError
from ddtas_lightning.report.study import TARGET_GAP, arm_label, main, meets_target, report, settings
from tests.test_compare import make_run

HYPER = "ddtas_lightning.policies.HypergradThreshold"


def _overrides(arm: str, lam: float, seed: int) -> list[str]:
    return ["experiment=threshold_study", f"arm=study/{arm}", f"loss.threshold={lam}", f"seed={seed}"]


def make_setting(root, name, grid: dict[float, tuple[list[float], list[float]]],
                 learned: dict[tuple[str, float], tuple[list[float], list[float], float]]):
    """grid: lambda -> (test R@1 per seed, val R@1 per seed); learned: (arm, start) -> (test, end lambdas, CPU s)."""
    num = 0
    for lam, (tests, vals) in grid.items():
        for seed, (t, v) in enumerate(zip(tests, vals)):
            make_run(root / name / "grid", num, "study/static", seed, r1=t, val=v, lam=lam, cpu=10.0,
                     dataset=name, overrides=_overrides("static", lam, seed))
            num += 1
    num = 0
    for (arm, start), (tests, ends, cpu) in learned.items():
        for seed, (t, end) in enumerate(zip(tests, ends)):
            make_run(root / name / "learned", num, f"study/{arm}", seed, r1=t, lam=start, cpu=cpu, policy=HYPER,
                     lambdas=[start, (start + end) / 2, end], dataset=name,
                     overrides=_overrides(arm, start, seed))
            num += 1


GRID = {  # val picks 0.2 at every seed; 0.2 is also the best on test; 0.8 the worst
    -0.2: ([0.10, 0.11, 0.12], [0.20, 0.21, 0.22]),
    0.2: ([0.15, 0.16, 0.18], [0.30, 0.31, 0.32]),
    0.8: ([0.05, 0.06, 0.05], [0.10, 0.11, 0.12]),
}
LEARNED = {
    ("hg", -0.2): ([0.151, 0.161, 0.181], [0.2, 0.2, 0.2], 5.0),   # +0.1 points, cheap (grid/arm = 6)
    ("hg", 0.8): ([0.12, 0.14, 0.15], [0.5, 0.4, 0.6], 5.0),       # worse
    ("meta", -0.2): ([0.15, 0.16, 0.18], [-0.2, -0.2, -0.2], 20.0),  # equal but expensive
}


@pytest.fixture
def study(tmp_path):
    make_setting(tmp_path, "synth_100", GRID, LEARNED)
    flat = {lam: ([0.10, 0.12, 0.11], [0.2, 0.2, 0.2]) for lam in (-0.2, 0.2, 0.8)}
    make_setting(tmp_path, "glyphs_100", flat, {("hg", -0.2): ([0.10, 0.12, 0.11], [0.0] * 3, 5.0)})
    return tmp_path


def test_labels_name_the_arm_and_its_start(study):
    s = {x.name: x for x in settings(study)}["synth_100"]
    assert [a.label for a in s.comparison.arms] == ["λ -0.2", "λ 0.2", "λ 0.8", "hg from -0.2", "hg from 0.8",
                                                    "meta from -0.2"]
    assert arm_label(s.comparison.arms[3].arm.first) == "hg from -0.2"


def test_each_learned_arm_is_paired_with_the_validation_pick_and_judged_against_the_target(study):
    s = {x.name: x for x in settings(study)}["synth_100"]
    c = s.comparison
    assert c.headline.label() == "λ 0.2"
    v = {x.arm.label: x for x in c.versus}
    diffs = [a - b for a, b in zip(LEARNED[("hg", 0.8)][0], GRID[0.2][0])]
    ref = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert v["hg from 0.8"].r1.low == pytest.approx(ref.low) and v["hg from 0.8"].r1.high == pytest.approx(ref.high)
    assert v["hg from 0.8"].verdict == "worse" and meets_target(v["hg from 0.8"]) == "no"
    assert v["hg from -0.2"].r1.mean == pytest.approx(0.001)
    assert v["hg from -0.2"].compute_ratio == pytest.approx(30.0 / 5.0)
    assert meets_target(v["hg from -0.2"]) == "yes"          # interval within -0.5 points, 1/6 of the compute
    assert meets_target(v["meta from -0.2"]) == "no (compute)"  # 20 CPU s > 1/4 of 30
    assert s.threshold_matters and s.best_label == "λ 0.2" and s.worst_label == "λ 0.8"


def test_a_gap_inside_the_target_by_the_mean_only_is_said_so(tmp_path):
    learned = {("hg", -0.2): ([0.155, 0.150, 0.178], [0.2] * 3, 5.0)}  # mean -0.23 points, wide interval
    make_setting(tmp_path, "s", GRID, learned)
    v = settings(tmp_path)[0].comparison.versus[0]
    assert v.r1.mean > -TARGET_GAP and v.r1.low < -TARGET_GAP
    assert meets_target(v) == "mean only"


def test_a_flat_grid_is_flagged_and_the_report_has_the_ablation_table_and_plots(study, capsys):
    assert main([str(study)]) == 0
    text = (study / "report" / "report.md").read_text()
    assert "glyphs_100 (flat)" in text and "this setting proves nothing" in text
    ablation = text.split("## Ablation")[1].split("## Per setting")[0]
    rows = [r for r in ablation.splitlines() if r.startswith("| hg from -0.2")]
    assert len(rows) == 1 and rows[0].count("[") == 2  # one cell per setting
    assert (study / "report" / "lambda_synth_100.png").stat().st_size > 0
    assert not math.isnan(settings(study)[1].comparison.grid_cpu_s)


def test_a_grid_whose_spread_is_significant_but_under_one_point_is_flat(tmp_path):
    small = {0.2: ([0.105, 0.106, 0.108], [0.3] * 3), 0.8: ([0.100, 0.101, 0.102], [0.2] * 3)}
    make_setting(tmp_path, "small", small, {("hg", 0.8): ([0.1, 0.1, 0.1], [0.5] * 3, 5.0)})
    s = settings(tmp_path)[0]
    assert s.spread.low > 0 and s.spread.high < 0.01  # significant, but within 1 point
    assert not s.threshold_matters


def test_a_directory_without_settings_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "make study" in err[0]
    (tmp_path / "s" / "grid").mkdir(parents=True)
    assert main([str(tmp_path)]) == 2
    assert "learned/ sweep" in capsys.readouterr().err


def test_the_trained_model_is_compared_with_the_untrained_one_paired_by_seed(tmp_path):
    # Raw features at 0.40 in every run; the validation pick (0.2 at each seed) tests 0.45 / 0.47 / 0.43.
    from ddtas_lightning.report.study import report, trained_vs_untrained

    for lam, tests, vals in ((-0.2, [0.44, 0.44, 0.44], [0.1] * 3), (0.2, [0.45, 0.47, 0.43], [0.3] * 3)):
        for seed in range(3):
            make_run(tmp_path / "real_1000" / "grid", seed + (3 if lam > 0 else 0), "study/static", seed,
                     r1=tests[seed], val=vals[seed], lam=lam, cpu=10.0, untrained=0.40,
                     overrides=_overrides("static", lam, seed))
    make_run(tmp_path / "real_1000" / "learned", 0, "study/hg", 0, r1=0.4, lam=-0.2, policy=HYPER,
             overrides=_overrides("hg", -0.2, 0))
    (setting,) = settings(tmp_path)
    interval, raw = trained_vs_untrained(setting.comparison)
    diffs = [0.05, 0.07, 0.03]
    half = sps.t.ppf(0.975, 2) * sps.tstd(diffs) / math.sqrt(3)
    assert raw == pytest.approx(0.40)
    assert interval.mean == pytest.approx(0.05) and interval.low == pytest.approx(0.05 - half)
    assert "trained (the grid chosen on validation) − untrained model (test R@1 40.0" in report([setting])
    assert "beats it" in report([setting])


def test_vs_untrained_pairs_each_run_with_its_own_untrained_metrics(tmp_path, capsys):
    from ddtas_lightning.report.vs_untrained import main as vs_main
    from ddtas_lightning.report.vs_untrained import versus_untrained

    for seed, (test, raw) in enumerate([(0.60, 0.40), (0.64, 0.42), (0.62, 0.44)]):
        make_run(tmp_path / "ft", seed, "ft", seed, r1=test, untrained=raw, overrides=[f"seed={seed}"])
    make_run(tmp_path / "ft", 3, "ft", 3, r1=0.9, overrides=["seed=3"])  # no untrained metrics: left out
    found = versus_untrained(tmp_path / "ft")
    diffs = [0.20, 0.22, 0.18]
    half = sps.t.ppf(0.975, 2) * sps.tstd(diffs) / math.sqrt(3)
    assert (found.runs, found.left_out) == (3, 1)
    assert found.untrained["R@1"] == pytest.approx(0.42) and found.trained["R@1"] == pytest.approx(0.62)
    assert found.delta["R@1"].low == pytest.approx(0.20 - half)
    assert found.delta["MAP@R"].mean == pytest.approx(0.05)  # make_run's MAP@R is R@1 / 4
    assert vs_main([str(tmp_path / "ft")]) == 0 and "+20.0" in capsys.readouterr().out
    make_run(tmp_path / "none", 0, "ft", 0, r1=0.5)
    assert vs_main([str(tmp_path / "none")]) == 2 and "evaluate_before_training" in capsys.readouterr().err


# ---- searches (issue 23): an Optuna study per seed, pruned trials' compute included ------------------------
def make_search(root, setting: str, name: str, seed: int, trials: list[tuple[float, float | None, float, float]],
                *, sampler: str = "Grid", pruner: str = "successive_halving"):
    """One seed's study in ``<setting>/search_<name>/seed<seed>/``; trials: (lambda, val R@1, test R@1 or None for
    a pruned trial, CPU s), in trial order."""
    sweep = root / setting / f"search_{name}" / f"seed{seed}"
    record = []
    for num, (lam, val, test, cpu) in enumerate(trials):
        run = make_run(sweep, num, "study/static", seed, r1=0.0 if test is None else test, val=val, lam=lam, cpu=cpu,
                       dataset=setting, overrides=[*_overrides("static", lam, seed), f"hparams_search={name}"])
        if test is None:  # as runtime/training.py leaves a pruned trial: its validations and compute, no test
            metrics = json.loads((run / "metrics.json").read_text())
            metrics.update(status="pruned", pruned={"at_validation": 1})
            metrics.pop("test")
            (run / "metrics.json").write_text(json.dumps(metrics))
        record.append({"number": num, "params": {"loss.threshold": lam}, "value": val,
                       "state": "PRUNED" if test is None else "COMPLETE"})
    (sweep / "optuna.json").write_text(json.dumps({"seed": seed, "sampler": sampler, "trials": record,
                                                   "pruner": {"kind": pruner, "options": {}}}))
    return sweep


# (lambda, val, test or None: pruned, CPU s). The validation pick (λ 0.2) tests 0.15 / 0.16 / 0.18, 30 CPU s a seed.
CHEAP = {  # the picks match the grid's within 0.2 point; 6, 5, 5 CPU s a seed, pruned trials included (< 30 / 4)
    0: [(0.2, 0.30, 0.151, 2.0), (0.8, 0.35, None, 1.0), (-0.2, 0.20, 0.10, 2.0), (0.4, 0.10, None, 1.0)],
    1: [(0.4, 0.29, 0.158, 2.0), (0.2, 0.31, 0.162, 2.0), (0.8, 0.50, None, 1.0)],
    2: [(0.2, 0.32, 0.179, 3.0), (0.0, 0.20, None, 1.0), (0.6, 0.25, None, 1.0)],
}


def test_a_search_is_one_family_paired_by_seed_with_the_grid_at_the_compute_of_all_its_trials(tmp_path):
    make_setting(tmp_path, "synth_100", GRID, {})
    for seed, trials in CHEAP.items():
        make_search(tmp_path, "synth_100", "study_grid_sha", seed, trials)
    (s,) = settings(tmp_path)  # a grid and a search, no learned sweep: a setting
    (search,) = s.searches
    v = search.versus
    # per seed, the validation-best complete trial; a pruned one with a higher validation R@1 is never it
    picks = {0: 0.151, 1: 0.162, 2: 0.179}
    assert v.arm.arm.by_seed("R@1") == pytest.approx(picks)
    diffs = [picks[seed] - GRID[0.2][0][seed] for seed in range(3)]
    ref = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert v.r1.mean == pytest.approx(sum(diffs) / 3)
    assert (v.r1.low, v.r1.high) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert v.verdict == "indistinguishable"
    cpu = [sum(t[3] for t in trials) for trials in CHEAP.values()]  # 6, 5, 5: pruned trials included
    assert v.arm.cpu.mean == pytest.approx(sum(cpu) / 3)
    assert v.compute_ratio == pytest.approx(30.0 / (sum(cpu) / 3))
    assert meets_target(v) == "yes"
    assert search.label == ("search study_grid_sha (Grid + SHA, 3.3 trials: 1.7 complete, 1.7 pruned per seed)")
    assert v.arm.thresholds == "chose λ 0.2 x3"
    text = report([s])
    assert f"| {search.label} | 3 | 16.4 ± 1.4 | chose λ 0.2 x3 | +0.1 [" in text
    ablation = text.split("## Ablation")[1].split("## Per setting")[0]
    assert "| search study_grid_sha | +0.1 [" in ablation and ablation.rstrip().endswith("yes |")


def test_an_expensive_search_misses_the_target_on_compute_and_unpaired_seeds_are_left_out(tmp_path):
    make_setting(tmp_path, "synth_100", GRID, LEARNED)
    for seed in range(4):  # seed 3: no grid run at that seed
        test = GRID[0.2][0][seed] if seed < 3 else 0.5
        make_search(tmp_path, "synth_100", "study_tpe_median", seed,
                    [(0.21, 0.3, test, 10.0), (0.5, 0.2, None, 5.0)], sampler="TPE", pruner="median")
    (s,) = settings(tmp_path)
    v = s.searches[0].versus
    assert v.r1.mean == pytest.approx(0.0) and v.r1.n == 3  # seed 3 left out of the pairing
    assert v.compute_ratio == pytest.approx(30.0 / 15.0)
    assert meets_target(v) == "no (compute)"
    assert s.searches[0].label.startswith("search study_tpe_median (TPE + median, 2 trials: 1 complete, 1 pruned")
    assert "seed 3 not in the grid: left out of ΔR@1" in s.searches[0].label


def test_a_search_dir_without_an_optuna_study_is_an_error_naming_it(tmp_path, capsys):
    make_setting(tmp_path, "synth_100", GRID, LEARNED)
    empty = tmp_path / "synth_100" / "search_study_grid_sha" / "seed0"
    make_run(empty, 0, "study/static", 0, r1=0.1, overrides=_overrides("static", 0.2, 0))  # a trial, no optuna.json
    with pytest.raises(SweepError, match=r"search_study_grid_sha: no Optuna sweep.*seed<k>/optuna\.json"):
        settings(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "search_study_grid_sha" in capsys.readouterr().err
