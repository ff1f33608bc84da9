"""``threshold_policy.every=3`` through the CLI: a run stopped one step into a period (step 7 of 10)
and resumed from its last.ckpt ends exactly where the uninterrupted run ends (the hold/update
schedule follows the restored global step)."""

from __future__ import annotations

from tests.test_resume import META, resumed_equals_uninterrupted


def test_every_3_resumed_mid_period_matches_uninterrupted_run(tmp_path, data_dir):
    a = resumed_equals_uninterrupted(tmp_path, data_dir, [*META, "threshold_policy.every=3"])
    assert int(a["policy.step_count"]) == 4  # meta steps 0, 3, 6, 9 of 10
