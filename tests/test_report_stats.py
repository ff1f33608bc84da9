"""Paired intervals and verdicts (ddtas_lightning/report/stats.py): the t interval against scipy's own
one-sample t test, the hierarchical paired bootstrap against a slow reference written from its
definition (explicit resampling loops, another random stream: the quantiles must agree within Monte
Carlo error), and the verdict and seeds-needed rules on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ddtas_lightning.report.stats import paired_bootstrap, seeds_for_half_width, t_interval, verdict


@pytest.mark.parametrize("diffs", [[0.01, 0.03, 0.02], [-0.05, 0.02, 0.01, 0.04, -0.01], [0.1, 0.1 + 1e-9]])
def test_t_interval_equals_scipy_one_sample_t_test(diffs):
    iv = t_interval(diffs)
    ref = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert iv.method == "t" and iv.n == len(diffs)
    assert iv.mean == pytest.approx(np.mean(diffs), abs=1e-15)
    assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))


def test_t_interval_of_one_seed_has_no_bounds_and_no_verdict():
    iv = t_interval([0.02])
    assert iv.mean == 0.02 and math.isnan(iv.low) and iv.verdict.startswith("undecided")
    assert math.isnan(t_interval([]).mean)


@pytest.mark.parametrize("low, high, expected", [(0.001, 0.2, "better"), (-0.3, -0.01, "worse"),
                                                 (-0.01, 0.02, "indistinguishable"), (0.0, 0.1, "indistinguishable")])
def test_verdict_reads_the_interval(low, high, expected):
    assert verdict(low, high) == expected


def reference_bootstrap(dyn, ref, n_boot, rng):
    """Draw seeds with replacement; within each drawn seed draw queries with replacement, the same
    draw for both arms; the replicate is the mean over drawn seeds of the mean paired difference."""
    reps = []
    for _ in range(n_boot):
        seeds = [int(rng.integers(len(dyn))) for _ in range(len(dyn))]
        per_seed = []
        for s in seeds:
            q = rng.integers(len(dyn[s]), size=len(dyn[s]))
            per_seed.append(float(np.mean(dyn[s][q] - ref[s][q])))
        reps.append(np.mean(per_seed))
    return np.quantile(reps, [0.025, 0.975])


def test_bootstrap_matches_the_slow_reference_within_monte_carlo_error():
    rng = np.random.default_rng(1)
    n_q = 60
    # seed effects (a shared shift per seed) and query effects: both levels matter
    ref = [rng.binomial(1, 0.4, n_q).astype(float) for _ in range(4)]
    dyn = [np.clip(r + rng.binomial(1, 0.15 + 0.05 * s, n_q) - rng.binomial(1, 0.1, n_q), 0, 1)
           for s, r in enumerate(ref)]
    iv = paired_bootstrap(dyn, ref, n_boot=4000, seed=0)
    low, high = reference_bootstrap(dyn, ref, 4000, np.random.default_rng(123))
    width = high - low
    assert iv.method == "bootstrap" and iv.n == 4
    assert iv.mean == pytest.approx(np.mean([(d - r).mean() for d, r in zip(dyn, ref)]))
    assert abs(iv.low - low) < 0.08 * width and abs(iv.high - high) < 0.08 * width


def test_bootstrap_keeps_the_pairing_of_queries():
    # The same per-query values in both arms, shifted by a constant: every replicate's difference is
    # exactly that constant (an unpaired resampling would spread it).
    rng = np.random.default_rng(0)
    ref = [rng.random(50) for _ in range(3)]
    dyn = [r + 0.05 for r in ref]
    iv = paired_bootstrap(dyn, ref, n_boot=500)
    assert iv.low == pytest.approx(0.05) and iv.high == pytest.approx(0.05) and iv.verdict == "better"


def test_bootstrap_needs_the_same_queries_in_every_seed():
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap([np.zeros(3), np.zeros(4)], [np.zeros(3), np.zeros(4)])
    assert math.isnan(paired_bootstrap([np.zeros(3)], [np.zeros(3)]).low)  # one seed: no interval


def test_seeds_for_half_width():
    # sd 0.02: n = 19 gives t_{.975,18} * 0.02 / sqrt(19) = 0.00964 <= 0.01, n = 18 gives 0.01 + ...
    n = seeds_for_half_width(0.02, 0.01)
    assert sps.t.ppf(0.975, n - 1) * 0.02 / math.sqrt(n) <= 0.01 < sps.t.ppf(0.975, n - 2) * 0.02 / math.sqrt(n - 1)
    assert seeds_for_half_width(math.nan, 0.01) is None and seeds_for_half_width(0.0, 0.01) == 2
