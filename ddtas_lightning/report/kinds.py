"""Static versus dynamic: which runs tune a threshold by grid search and which adapt or learn it.

A run is *dynamic* when its threshold policy is not the fixed lambda (meta-learned lambda, MMSI's
learned pair weights, ...) or its miner adapts its margins to every batch (AT-ASMS); otherwise it is a
point of the *static* grid. The compare report and the W&B tags share this one rule.
"""

from __future__ import annotations

STATIC_POLICIES = frozenset({"StaticThreshold"})
ADAPTIVE_MINERS = frozenset({"AdaptiveToleranceASMS"})


def class_name(target: str | None) -> str:
    """``pkg.module.Class`` -> ``Class`` (a ``_target_`` or the class name metrics.json records)."""
    return (target or "").rsplit(".", 1)[-1]


def run_kind(policy_target: str | None, miner_target: str | None) -> str:
    """``"static"`` or ``"dynamic"`` from the threshold policy's and the miner's ``_target_``."""
    policy = class_name(policy_target) or "StaticThreshold"  # no policy recorded: the default
    dynamic = policy not in STATIC_POLICIES or class_name(miner_target) in ADAPTIVE_MINERS
    return "dynamic" if dynamic else "static"
