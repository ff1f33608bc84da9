"""Paired differences with 95% intervals and a verdict: is a learned arm better, worse or
indistinguishable from the grid point chosen on validation?

Two intervals on the paired difference ``d_s = dynamic(s) - reference(s)`` over the seeds s both arms
ran:

* **t over seeds** (:func:`t_interval`): ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)``, Student's t
  with n - 1 degrees of freedom. Needs n >= 2; with 3 seeds t_{0.975, 2} = 4.30, so the interval is
  wide unless the seeds agree. It treats the test set as fixed and asks whether the gap survives a
  new training seed.
* **hierarchical bootstrap over seeds and queries** (:func:`paired_bootstrap`), when every run saved
  its per-query test results (``per_query_test.npz``): each replicate draws n seeds with replacement
  and, within each drawn seed, the test queries with replacement (the *same* query draw for both arms:
  they are evaluated on the same queries, so the pairing is kept), and takes the mean over the drawn
  seeds of the mean per-query difference; the interval is the 2.5 / 97.5 percentiles. It adds the
  uncertainty of a finite test set to the seed noise.

The verdict (:func:`verdict`) reads the interval: ``better`` when it lies above 0, ``worse`` when it
lies below, else ``indistinguishable``. :func:`seeds_for_half_width` says how many seeds a t interval
with the observed spread would need to reach a given half-width.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean difference and its ``level`` interval ``[low, high]`` (NaN bounds: not computable)."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "t", "bootstrap" or "none"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if math.isnan(self.mean):
            return "n/a"
        mean = f"{self.mean * scale:+.{digits}f}"
        if math.isnan(self.low):
            return mean
        return f"{mean} [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"


def verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "undecided (fewer than 2 seeds)"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "indistinguishable"


def t_interval(diffs: list[float], level: float = LEVEL) -> Interval:
    """Student-t interval of the mean of ``diffs`` (paired differences, one per seed)."""
    values = [d for d in diffs if not math.isnan(d)]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "none")
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t")


def paired_bootstrap(dynamic: list[np.ndarray], reference: list[np.ndarray], *, n_boot: int = 2000,
                     seed: int = 0, level: float = LEVEL) -> Interval:
    """Hierarchical paired bootstrap (seeds, then queries) of ``mean_s mean_q (dynamic - reference)``.

    ``dynamic[i]`` and ``reference[i]``: the per-query values (e.g. R@1 hits, AP@R) of the two arms'
    runs with the i-th common seed, on the same queries in the same order.
    """
    diffs = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) for a, b in zip(dynamic, reference)]
    if not diffs or any(d.ndim != 1 or d.size == 0 for d in diffs):
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    if len({d.size for d in diffs}) != 1:
        raise ValueError(f"paired_bootstrap: every seed needs the same queries, got sizes {[d.size for d in diffs]}")
    mean = float(np.mean([d.mean() for d in diffs]))
    n_seeds, n_queries = len(diffs), diffs[0].size
    if n_seeds < 2:
        return Interval(mean, math.nan, math.nan, n_seeds, "none")
    rng = np.random.default_rng(seed)
    table = np.stack(diffs)  # (seeds, queries)
    uniform = np.full(n_queries, 1.0 / n_queries)
    replicates = np.empty(n_boot)
    # A draw of n_queries with replacement is a multinomial count per query; blocks bound the memory.
    for start in range(0, n_boot, 64):
        b = min(64, n_boot - start)
        seed_draws = rng.integers(0, n_seeds, size=(b, n_seeds))
        counts = rng.multinomial(n_queries, uniform, size=(b, n_seeds))
        per_seed = np.einsum("bsq,bsq->bs", counts, table[seed_draws]) / n_queries
        replicates[start:start + b] = per_seed.mean(axis=1)
    low, high = np.quantile(replicates, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(mean, float(low), float(high), n_seeds, "bootstrap")


def seeds_for_half_width(sd: float, half_width: float, level: float = LEVEL, max_n: int = 10_000) -> int | None:
    """The smallest n with ``t_{level, n-1} * sd / sqrt(n) <= half_width`` (None: sd unknown)."""
    if math.isnan(sd) or half_width <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, max_n + 1):
        if float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n) <= half_width:
            return n
    return max_n
