"""The CSV logger continues its file on resume: rows before the resumed step are kept, the steps after
the checkpoint that the crashed run had logged are replaced (never doubled), new columns extend the
header; without ``resume`` an old file is replaced (Lightning's behaviour). The end-to-end SIGKILL +
resume check of the CSV log is in tests/test_sigkill_resume.py."""

from __future__ import annotations

import csv
from pathlib import Path

from ddtas_lightning.report.csv_logger import ContinuingCSVLogger


def rows(path: Path) -> list[dict]:
    with (path / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def log(tmp_path: Path, resume, steps: dict[int, dict]) -> ContinuingCSVLogger:
    logger = ContinuingCSVLogger(save_dir=str(tmp_path), name="csv", version="", resume=resume,
                                 flush_logs_every_n_steps=1)
    for step, values in steps.items():
        logger.log_metrics(values, step=step)
    logger.save()
    return logger


def test_resume_keeps_earlier_rows_and_replaces_the_recomputed_ones(tmp_path):
    log(tmp_path, None, {s: {"train/loss": float(s)} for s in range(8)})  # crashed after step 7
    log(tmp_path, "last", {s: {"train/loss": 100.0 + s} for s in range(6, 10)})  # resumed from step 6
    got = [(int(r["step"]), float(r["train/loss"])) for r in rows(tmp_path)]
    assert got == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 10)]


def test_new_columns_after_a_resume_extend_the_header(tmp_path):
    log(tmp_path, None, {0: {"train/loss": 1.0}, 1: {"train/loss": 2.0}})
    log(tmp_path, "last", {2: {"train/loss": 3.0, "val/R@1": 0.5}})
    got = rows(tmp_path)
    assert [r["train/loss"] for r in got] == ["1.0", "2.0", "3.0"]
    assert [r["val/R@1"] for r in got] == ["", "", "0.5"]


def test_untrained_rows_do_not_decide_where_the_resumed_run_starts(tmp_path):
    log(tmp_path, None, {0: {"untrained/R@1": 0.1}, **{s: {"train/loss": float(s)} for s in range(1, 5)}})
    logger = ContinuingCSVLogger(save_dir=str(tmp_path), name="csv", version="", resume="last")
    logger.log_metrics({"untrained/R@1": 0.1}, step=0)
    logger.save()  # only the untrained evaluation so far: nothing is dropped yet
    assert [r["step"] for r in rows(tmp_path)] == ["0", "1", "2", "3", "4", "0"]
    logger.log_metrics({"train/loss": 30.0}, step=3)
    logger.save()
    got = [(r["step"], r["train/loss"] or r["untrained/R@1"]) for r in rows(tmp_path)]
    assert got == [("0", "0.1"), ("1", "1.0"), ("2", "2.0"), ("0", "0.1"), ("3", "30.0")]


def test_without_resume_an_old_file_is_replaced(tmp_path):
    log(tmp_path, None, {s: {"train/loss": float(s)} for s in range(5)})
    log(tmp_path, None, {0: {"train/loss": 9.0}})
    assert [(r["step"], r["train/loss"]) for r in rows(tmp_path)] == [("0", "9.0")]
