"""``logger=csv``: Lightning's ``CSVLogger`` that continues its file when a run resumes.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a requeued or resumed
run kept only the steps after its restart, and the report's lambda / mining curves lost the rest.
This one keeps the file: it reads the existing header (so the columns stay) and, on the first save
after a restart, drops the old rows at or after the first step the resumed run logs again (the steps
between the checkpoint and the crash are recomputed, and must not appear twice), then appends. Rows
of the untrained evaluation (``untrained/*``, logged at step 0 before training) do not count as that
first step. conf/logger/csv.yaml flushes every step, so the file holds every step up to a crash. A
run that starts afresh in a directory with a stale log (``resume=false``) starts a new file, as
Lightning's would.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class ContinuingExperimentWriter(ExperimentWriter):
    """Appends to an existing ``metrics.csv`` (see the module docstring)."""

    def __init__(self, log_dir: str, keep_existing: bool) -> None:
        self._keep_existing = keep_existing
        self._pending_trim = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._keep_existing or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = sorted(k for k in header if k)
        self._pending_trim = True

    def _trim_from(self, first_step: int) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step") in (None, "") or int(float(r["step"])) < first_step]
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)

    def save(self) -> None:
        if self._pending_trim and self.metrics:
            self._pending_trim = False
            self._record_new_keys()
            steps = [int(m["step"]) for m in self.metrics
                     if any(not k.startswith("untrained/") for k in m if k not in ("step", "epoch"))]
            if steps:
                self._trim_from(min(steps))
            else:
                self._pending_trim = True  # only the untrained evaluation so far: decide on the next save
        super().save()


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose file survives a resume (``resume``: the run restarts from a checkpoint)."""

    def __init__(self, *args, resume: bool | str | None = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume = bool(resume)  # ckpt_path: a path or "last" resumes; null starts afresh

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(self.log_dir, keep_existing=self._resume)
        return self._experiment
